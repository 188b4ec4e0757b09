//! MurmurHash3 x64_128 (Austin Appleby's reference, as used by Cilium's
//! `pkg/murmur3`). Blocks are read little-endian, which is what Cilium produces
//! on the little-endian machines it runs on.

const C1: u64 = 0x87c3_7b91_1142_53d5;
const C2: u64 = 0x4cf5_ad43_2745_937f;

#[inline(always)]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[inline(always)]
fn mix_k1(k1: u64) -> u64 {
    k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2)
}

#[inline(always)]
fn mix_k2(k2: u64) -> u64 {
    k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1)
}

/// MurmurHash3 x64_128 of `data` with a 32-bit `seed`; returns `(h1, h2)`.
pub fn hash128(data: &[u8], seed: u32) -> (u64, u64) {
    let mut h1 = u64::from(seed);
    let mut h2 = u64::from(seed);

    let mut blocks = data.chunks_exact(16);
    for block in &mut blocks {
        let (lo, hi) = block.split_at(8);
        let k1 = u64::from_le_bytes(lo.try_into().unwrap_or([0; 8]));
        let k2 = u64::from_le_bytes(hi.try_into().unwrap_or([0; 8]));

        h1 ^= mix_k1(k1);
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= mix_k2(k2);
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }

    // The tail (0..=15 bytes) is assembled little-endian into k1 (bytes 0..8)
    // and k2 (bytes 8..16), exactly like the reference's fall-through switch.
    let tail = blocks.remainder();
    if tail.len() > 8 {
        let k2 = tail[8..]
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &b)| acc | (u64::from(b) << (8 * i)));
        h2 ^= mix_k2(k2);
    }
    if !tail.is_empty() {
        let k1 = tail[..tail.len().min(8)]
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &b)| acc | (u64::from(b) << (8 * i)));
        h1 ^= mix_k1(k1);
    }

    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    (h1, h2)
}

#[cfg(test)]
mod tests {
    use super::hash128;

    /// Published MurmurHash3_x64_128 vectors (smhasher reference output as
    /// used by the spaolacci/twmb Go packages and others).
    #[test]
    fn reference_vectors() {
        let cases: &[(u32, &str, u64, u64)] = &[
            (0, "", 0, 0),
            (0, "hello", 0xcbd8a7b341bd9b02, 0x5b1e906a48ae1d19),
            (0, "hello, world", 0x342fac623a5ebc8e, 0x4cdcbc079642414d),
            (
                0,
                "19 Jan 2038 at 3:14:07 AM",
                0xb89e5988b737affc,
                0x664fc2950231b2cb,
            ),
            (
                0,
                "The quick brown fox jumps over the lazy dog.",
                0xcd99481f9ee902c9,
                0x695da1a38987b6e7,
            ),
            (
                0,
                "The quick brown fox jumps over the lazy dog",
                0xe34bbc7bbc071b6c,
                0x7a433ca9c49a9347,
            ),
            (0, "123456789012345", 0x887001aea2afcfd6, 0x1ec326364f0801b3),
            (
                0,
                "1234567890123456",
                0x4fbe5dc5c0e32cf8,
                0xc0c8e96b60c322c1,
            ),
            (
                0,
                "12345678901234567",
                0x748617968026b77e,
                0x291e6386473f7103,
            ),
            (
                0,
                "abcdefghijklmnop",
                0xc4ca3ca3224cb723,
                0x4333d695b331eb1a,
            ),
            (1, "", 0x4610abe56eff5cb5, 0x51622daa78f83583),
            (1, "hello", 0xa78ddff5adae8d10, 0x128900ef20900135),
            (1, "hello, world", 0x8b95f808840725c6, 0x1597ed5422bd493b),
            (
                1,
                "19 Jan 2038 at 3:14:07 AM",
                0x2a929de9c8f97b2f,
                0x56a41d99af43a2db,
            ),
            (
                1,
                "The quick brown fox jumps over the lazy dog.",
                0xfb3325171f9744da,
                0xaaf8b92a5f722952,
            ),
            (0x2a, "", 0xf02aa77dfa1b8523, 0xd1016610da11cbb9),
            (0x2a, "hello", 0xc4b8b3c960af6f08, 0x2334b875b0efbc7a),
            (
                0x2a,
                "f02aa77dfa1b8523d1016610da11cbb9",
                0x7149c40ec7c51a23,
                0xcf1caa9a8c81cea5,
            ),
        ];
        for &(seed, input, h1, h2) in cases {
            assert_eq!(
                hash128(input.as_bytes(), seed),
                (h1, h2),
                "seed {seed:#x} input {input:?}"
            );
        }
    }

    #[test]
    fn every_tail_length_differs() {
        // Each tail length takes its own path through the tail assembly; a
        // dropped byte would make two prefixes collide.
        let data: Vec<u8> = (0u8..40).collect();
        let hashes: std::collections::HashSet<_> =
            (0..=data.len()).map(|n| hash128(&data[..n], 7)).collect();
        assert_eq!(hashes.len(), data.len() + 1);
    }
}
