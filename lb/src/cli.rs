//! Text side of `membrane lb maglev`:
//!
//! ```text
//! membrane lb maglev -m M [--seed B64] [--proto TCP|UDP] [--cluster-id N]
//!                    [--format list|rle] BACKEND[;w=W]...
//! ```
//!
//! `BACKEND` is `IP:PORT` (IPv6 as `[fd00::1]:80`); `W` is a Cilium backend
//! weight, 100 when left out, 0 meaning maintenance (no slots). The binary
//! wires clap onto [`MaglevArgs`]; everything else lives here.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::maglev::{
    self, ALLOWED_M, DEFAULT_BACKEND_WEIGHT, DEFAULT_HASH_SEED, MaglevBackend, MaglevConfig,
    MaglevError, Protocol,
};

/// Errors of the `lb` command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LbError {
    #[error("invalid table size {0:?}: M must be one of {ALLOWED_M:?} (Cilium's supported sizes)")]
    TableSize(String),
    #[error(
        "invalid backend {spec:?}: {reason} (expected IP:PORT[;w=WEIGHT], IPv6 as [fd00::1]:80)"
    )]
    Backend { spec: String, reason: String },
    #[error("backend {0} is listed more than once")]
    DuplicateBackend(String),
    #[error("no backends given")]
    NoBackends,
    #[error("every backend has weight 0 (maintenance); at least one needs a weight above 0")]
    AllInMaintenance,
    #[error("invalid output format {0:?} (expected list or rle)")]
    Format(String),
    #[error(transparent)]
    Maglev(#[from] MaglevError),
}

/// How `maglev_command` prints the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// One line per slot: the chosen backend's `IP:port`.
    #[default]
    List,
    /// Run-length `id(count)` with 1-based ids in command-line order.
    Rle,
}

impl FromStr for OutputFormat {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "list" => Ok(OutputFormat::List),
            "rle" => Ok(OutputFormat::Rle),
            _ => Err(LbError::Format(s.to_string())),
        }
    }
}

/// Arguments of `membrane lb maglev`, a plain struct for the binary's clap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevArgs {
    /// Table size; must be in [`ALLOWED_M`] (see [`parse_table_size`]).
    pub m: u32,
    /// Base64 hash seed (12 bytes decoded); `None` = Cilium's default.
    pub seed: Option<String>,
    pub proto: Protocol,
    pub cluster_id: u32,
    pub format: OutputFormat,
    /// `BACKEND[;w=W]` specs, in command-line order.
    pub backends: Vec<String>,
}

impl Default for MaglevArgs {
    fn default() -> Self {
        MaglevArgs {
            m: maglev::DEFAULT_M,
            seed: None,
            proto: Protocol::Tcp,
            cluster_id: 0,
            format: OutputFormat::List,
            backends: Vec::new(),
        }
    }
}

/// Parses `-m`, accepting only Cilium's table sizes.
pub fn parse_table_size(s: &str) -> Result<u32, LbError> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|m| ALLOWED_M.contains(m))
        .ok_or_else(|| LbError::TableSize(s.to_string()))
}

/// Parses one `IP:PORT[;w=W]` into a backend with the given protocol,
/// cluster id and table id.
pub fn parse_backend(
    spec: &str,
    proto: Protocol,
    cluster_id: u32,
    id: u32,
) -> Result<MaglevBackend, LbError> {
    let err = |reason: &str| LbError::Backend {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut parts = spec.split(';');
    let addr_part = parts.next().unwrap_or_default().trim();
    let mut weight = None;
    for opt in parts {
        let opt = opt.trim();
        let Some(value) = opt.strip_prefix("w=") else {
            return Err(err(&format!("unknown option {opt:?} (only w=WEIGHT)")));
        };
        if weight.is_some() {
            return Err(err("weight given twice"));
        }
        weight = Some(
            value
                .parse::<u16>()
                .map_err(|_| err(&format!("weight {value:?} is not an integer in 0..=65535")))?,
        );
    }
    if addr_part.is_empty() {
        return Err(err("missing address"));
    }
    let sa = SocketAddr::from_str(addr_part).map_err(|_| {
        if IpAddr::from_str(addr_part).is_ok()
            || IpAddr::from_str(addr_part.trim_start_matches('[').trim_end_matches(']')).is_ok()
        {
            err("missing port")
        } else {
            err("not an IP:PORT address")
        }
    })?;
    if let SocketAddr::V6(v6) = sa
        && (v6.scope_id() != 0 || v6.flowinfo() != 0)
    {
        return Err(err("IPv6 zone ids are not supported"));
    }
    if sa.port() == 0 {
        return Err(err("port 0 is not a valid backend port"));
    }
    Ok(MaglevBackend {
        addr: sa.ip(),
        port: sa.port(),
        proto,
        cluster_id,
        weight: weight.unwrap_or(DEFAULT_BACKEND_WEIGHT),
        state: maglev::BackendState::Active,
        id,
    })
}

/// Runs `membrane lb maglev`: the table as text, one `IP:port` per line
/// (`list`) or one run-length line (`rle`), newline-terminated.
pub fn maglev_command(args: MaglevArgs) -> Result<String, LbError> {
    if !ALLOWED_M.contains(&args.m) {
        return Err(LbError::TableSize(args.m.to_string()));
    }
    let cfg =
        MaglevConfig::from_seed_b64(args.m, args.seed.as_deref().unwrap_or(DEFAULT_HASH_SEED))?;
    if args.backends.is_empty() {
        return Err(LbError::NoBackends);
    }

    let mut backends = Vec::with_capacity(args.backends.len());
    let mut seen = HashSet::new();
    for (i, spec) in args.backends.iter().enumerate() {
        let id = u32::try_from(i + 1).map_err(|_| LbError::Backend {
            spec: spec.clone(),
            reason: "too many backends".to_string(),
        })?;
        let b = parse_backend(spec, args.proto, args.cluster_id, id)?;
        if !seen.insert((b.addr, b.port)) {
            return Err(LbError::DuplicateBackend(b.endpoint()));
        }
        backends.push(b);
    }

    let table = maglev::build_table(&cfg, &backends);
    if table.is_empty() {
        return Err(LbError::AllInMaintenance);
    }

    Ok(match args.format {
        OutputFormat::Rle => {
            let mut s = maglev::rle(&table);
            s.push('\n');
            s
        }
        OutputFormat::List => {
            let endpoints: Vec<String> = backends.iter().map(MaglevBackend::endpoint).collect();
            let mut s = String::with_capacity(table.len() * 16);
            for id in table {
                // Ids are 1-based positions into `backends`.
                let ep = endpoints
                    .get(id as usize - 1)
                    .map(String::as_str)
                    .unwrap_or("?");
                let _ = writeln!(s, "{ep}");
            }
            s
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK_VECTOR: &str = "2(2),1(2),2(1),3(1),2(2),1(1),3(3),2(2),3(1),1(3),3(1),2(2),3(1),1(1),3(1),1(1),2(3),1(3),3(1),2(1),3(2),1(1),2(1),1(1),2(2),3(1),2(1),1(3),2(1),3(4),1(1),2(1),1(2),2(2),1(2),2(1),3(3),1(2),2(1),1(1),2(2),3(1),1(2),3(4),2(1),1(1),2(1),1(1),2(2),3(2),1(1),3(3),1(1),2(3),1(1),2(2),3(2),1(2),3(2),1(1),2(2),1(2),2(1),3(3),2(1),1(1),3(1),2(1),1(1),2(2),3(1),1(1),2(1),3(2),2(1),3(1),1(1),3(1),1(2),2(2),3(1),1(1),2(1),1(1),3(1),2(1),3(2),1(3),2(1),1(1),3(1),2(2),1(1),3(1),2(1),3(2),2(1),1(2),2(1),1(1),2(2),1(2),3(3),2(2),1(2),2(1),1(1),2(2),3(1),1(1),3(3),2(3),1(3),2(2),3(1),1(1),2(1),3(2),2(1),1(1),2(1),1(3),2(1),3(3),2(1),3(1),1(1),2(1),1(1),2(2),1(2),2(1),3(5),1(3),2(2),1(2),2(1),3(4),1(4),2(1),3(2),1(1),2(1),3(2),2(1),3(1),2(1),1(3),2(1),3(2),2(1),1(1),3(3),2(1)";

    fn args(m: u32, format: OutputFormat, backends: &[&str]) -> MaglevArgs {
        MaglevArgs {
            m,
            format,
            backends: backends.iter().map(|s| s.to_string()).collect(),
            ..MaglevArgs::default()
        }
    }

    #[test]
    fn rle_check_vector() {
        let out = maglev_command(args(
            251,
            OutputFormat::Rle,
            &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
        ))
        .unwrap();
        assert_eq!(out, format!("{CHECK_VECTOR}\n"));
    }

    #[test]
    fn list_matches_rle() {
        let specs = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
        let out = maglev_command(args(251, OutputFormat::List, &specs)).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 251);
        // Rebuild the RLE from the list and compare with the check vector.
        let ids: Vec<u32> = lines
            .iter()
            .map(|l| specs.iter().position(|s| s == l).unwrap() as u32 + 1)
            .collect();
        assert_eq!(maglev::rle(&ids), CHECK_VECTOR);
    }

    #[test]
    fn ipv6_list_uses_brackets() {
        let out = maglev_command(args(
            251,
            OutputFormat::List,
            &["[fd00::1]:80", "[fd00::2]:80;w=100"],
        ))
        .unwrap();
        assert!(
            out.lines()
                .all(|l| l == "[fd00::1]:80" || l == "[fd00::2]:80")
        );
        assert!(out.lines().any(|l| l == "[fd00::1]:80"));
        assert!(out.lines().any(|l| l == "[fd00::2]:80"));
    }

    #[test]
    fn options_change_the_table() {
        let specs = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
        let base = maglev_command(args(251, OutputFormat::Rle, &specs)).unwrap();
        let mut udp = args(251, OutputFormat::Rle, &specs);
        udp.proto = Protocol::Udp;
        let mut cluster = args(251, OutputFormat::Rle, &specs);
        cluster.cluster_id = 3;
        let mut seeded = args(251, OutputFormat::Rle, &specs);
        seeded.seed = Some("AAAAAAAAAAAAAAAA".to_string());
        let outs = [
            base,
            maglev_command(udp).unwrap(),
            maglev_command(cluster).unwrap(),
            maglev_command(seeded).unwrap(),
        ];
        for i in 0..outs.len() {
            for j in i + 1..outs.len() {
                assert_ne!(outs[i], outs[j], "variants {i} and {j} gave the same table");
            }
        }
    }

    #[test]
    fn weight_zero_gets_no_slots() {
        let out = maglev_command(args(
            251,
            OutputFormat::List,
            &["10.0.0.1:80", "10.0.0.2:80;w=0"],
        ))
        .unwrap();
        assert!(out.lines().all(|l| l == "10.0.0.1:80"));
        assert_eq!(
            maglev_command(args(251, OutputFormat::Rle, &["10.0.0.1:80;w=0"])),
            Err(LbError::AllInMaintenance)
        );
    }

    #[test]
    fn table_size_validation() {
        assert_eq!(parse_table_size("16381"), Ok(16381));
        for bad in ["65537", "100", "7", "abc", ""] {
            let e = parse_table_size(bad).unwrap_err();
            assert!(e.to_string().contains("131071"), "{e}");
        }
        let e = maglev_command(args(65537, OutputFormat::Rle, &["10.0.0.1:80"])).unwrap_err();
        assert_eq!(e, LbError::TableSize("65537".to_string()));
    }

    #[test]
    fn seed_validation() {
        let mut a = args(251, OutputFormat::Rle, &["10.0.0.1:80"]);
        a.seed = Some("not base64!".to_string());
        assert!(matches!(
            maglev_command(a.clone()),
            Err(LbError::Maglev(MaglevError::SeedBase64 { .. }))
        ));
        a.seed = Some("AAAA".to_string());
        assert_eq!(
            maglev_command(a),
            Err(LbError::Maglev(MaglevError::SeedLength(3)))
        );
    }

    #[test]
    fn backend_parser() {
        let b = parse_backend("10.0.0.1:80;w=7", Protocol::Udp, 2, 5).unwrap();
        assert_eq!(b.addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((b.port, b.weight, b.id, b.cluster_id), (80, 7, 5, 2));
        assert_eq!(b.proto, Protocol::Udp);
        let b = parse_backend("[fd00::1]:443", Protocol::Tcp, 0, 1).unwrap();
        assert_eq!(b.weight, DEFAULT_BACKEND_WEIGHT);
        assert_eq!(b.endpoint(), "[fd00::1]:443");

        for (spec, needle) in [
            ("10.0.0.1", "missing port"),
            ("fd00::1", "missing port"),
            ("[fd00::1]", "missing port"),
            ("host:80", "not an IP:PORT"),
            ("10.0.0.1:80;w=x", "weight"),
            ("10.0.0.1:80;w=70000", "weight"),
            ("10.0.0.1:80;w=1;w=2", "twice"),
            ("10.0.0.1:80;x=1", "unknown option"),
            ("10.0.0.1:0", "port 0"),
            (";w=1", "missing address"),
            ("[fe80::1%2]:80", "zone"),
        ] {
            let e = parse_backend(spec, Protocol::Tcp, 0, 1).unwrap_err();
            assert!(e.to_string().contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn duplicate_and_empty() {
        assert_eq!(
            maglev_command(args(
                251,
                OutputFormat::Rle,
                &["10.0.0.1:80", "10.0.0.1:80;w=5"]
            )),
            Err(LbError::DuplicateBackend("10.0.0.1:80".to_string()))
        );
        assert_eq!(
            maglev_command(args(251, OutputFormat::Rle, &[])),
            Err(LbError::NoBackends)
        );
    }

    #[test]
    fn format_parser() {
        assert_eq!("RLE".parse::<OutputFormat>(), Ok(OutputFormat::Rle));
        assert_eq!("list".parse::<OutputFormat>(), Ok(OutputFormat::List));
        assert!("json".parse::<OutputFormat>().is_err());
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("icmp".parse::<Protocol>().is_err());
    }
}
