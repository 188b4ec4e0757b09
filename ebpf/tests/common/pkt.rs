//! Hand-built Ethernet/IP/TCP/UDP frames with correct checksums, and a
//! parser that verifies them.
#![allow(dead_code)]

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut it = data.chunks_exact(2);
    for c in &mut it {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = it.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        _ => panic!("mixed families"),
    }
    acc + u32::from(proto) + len as u32
}

/// A frame: Ethernet + IPv4/IPv6 + TCP (with `flags`) or UDP + payload.
/// `udp_zero_csum` leaves an IPv4 UDP checksum at 0 ("none").
#[allow(clippy::too_many_arguments)] // a frame is exactly these fields
pub fn frame(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: u8,
    flags: u8,
    payload: &[u8],
    udp_zero_csum: bool,
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    let csum_at;
    if proto == TCP {
        l4.extend_from_slice(&1u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.push(5 << 4);
        l4.push(flags);
        l4.extend_from_slice(&65535u16.to_be_bytes());
        csum_at = l4.len();
        l4.extend_from_slice(&[0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        csum_at = l4.len();
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    if !(proto == UDP && udp_zero_csum) {
        let mut c = fold(sum(&l4, pseudo(src, dst, proto, l4.len())));
        if proto == UDP && c == 0 {
            c = 0xffff;
        }
        l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = fold(sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.push(proto);
            f.push(64);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    f.extend_from_slice(&l4);
    f
}

/// Addresses and ports of a frame, panicking on any bad checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub l4_csum: u16,
}

pub fn parse(f: &[u8]) -> Parsed {
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let (src, dst, proto, l4) = match ethertype {
        0x0800 => {
            let ip = &f[14..34];
            assert_eq!(fold(sum(ip, 0)), 0, "bad IPv4 header checksum");
            let s: [u8; 4] = ip[12..16].try_into().unwrap();
            let d: [u8; 4] = ip[16..20].try_into().unwrap();
            (IpAddr::from(s), IpAddr::from(d), ip[9], &f[34..])
        }
        0x86dd => {
            let s: [u8; 16] = f[22..38].try_into().unwrap();
            let d: [u8; 16] = f[38..54].try_into().unwrap();
            (IpAddr::from(s), IpAddr::from(d), f[20], &f[54..])
        }
        t => panic!("unexpected ethertype {t:#x}"),
    };
    let csum_at = if proto == TCP { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([l4[csum_at], l4[csum_at + 1]]);
    if !(proto == UDP && l4_csum == 0) {
        assert_eq!(
            fold(sum(l4, pseudo(src, dst, proto, l4.len()))),
            0,
            "bad L4 checksum"
        );
    }
    Parsed {
        src,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dst,
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4_csum,
    }
}
