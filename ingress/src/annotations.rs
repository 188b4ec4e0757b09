//! The `ingress.cilium.io/*` annotations, parsed as Cilium's operator
//! parses them (`operator/pkg/ingress/annotations`), including the older
//! aliases Cilium still reads (`io.cilium.ingress/...`, `io.cilium/...`).
//!
//! Where Cilium silently falls back to a default on a value it cannot
//! parse, Membrane rejects the Ingress with an error naming the annotation,
//! so the user learns the setting is not what they asked for.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::networking::v1::Ingress;

/// Overrides `enforce_https_default` for the TLS hosts of one Ingress.
pub const FORCE_HTTPS: &str = "ingress.cilium.io/force-https";
/// Route timeout for every backend route of one Ingress (a Go duration).
pub const REQUEST_TIMEOUT: &str = "ingress.cilium.io/request-timeout";
/// `enabled`: route TLS connections by SNI to the backend, untouched.
pub const TLS_PASSTHROUGH: &str = "ingress.cilium.io/tls-passthrough";
/// Type of the generated Service: `LoadBalancer` (default) or `NodePort`.
pub const SERVICE_TYPE: &str = "ingress.cilium.io/service-type";
/// `externalTrafficPolicy` of the generated Service: `Cluster` or `Local`.
pub const SERVICE_EXTERNAL_TRAFFIC_POLICY: &str =
    "ingress.cilium.io/service-external-traffic-policy";
/// NodePort of the generated Service's `http` port (service-type NodePort).
pub const INSECURE_NODE_PORT: &str = "ingress.cilium.io/insecure-node-port";
/// NodePort of the generated Service's `https` port (service-type NodePort).
pub const SECURE_NODE_PORT: &str = "ingress.cilium.io/secure-node-port";
/// `spec.loadBalancerClass` of the generated Service.
pub const LOADBALANCER_CLASS: &str = "ingress.cilium.io/loadbalancer-class";
/// Host-network mode, dedicated Ingress: the port its listener binds.
pub const HOST_LISTENER_PORT: &str = "ingress.cilium.io/host-listener-port";
/// TCP keep-alive on the listener socket (`enabled`, default, or not).
pub const TCP_KEEP_ALIVE: &str = "ingress.cilium.io/tcp-keep-alive";
/// Seconds idle before keep-alive probes start (default 10).
pub const TCP_KEEP_ALIVE_IDLE: &str = "ingress.cilium.io/tcp-keep-alive-idle";
/// Seconds between keep-alive probes (default 5).
pub const TCP_KEEP_ALIVE_PROBE_INTERVAL: &str = "ingress.cilium.io/tcp-keep-alive-probe-interval";
/// Unanswered probes before the connection is dropped (default 10).
pub const TCP_KEEP_ALIVE_PROBE_MAX_FAILURES: &str =
    "ingress.cilium.io/tcp-keep-alive-probe-max-failures";
/// WebSocket upgrades (always allowed, as in current Cilium; validated).
pub const WEBSOCKET: &str = "ingress.cilium.io/websocket";

/// Every annotation this module reads, with the aliases Cilium accepts in
/// the order it looks them up. `loadbalancer-mode` lives in `shared.rs`.
pub const ALIASES: &[(&str, &[&str])] = &[
    (
        crate::shared::LOADBALANCER_MODE,
        &["io.cilium.ingress/loadbalancer-mode"],
    ),
    (SERVICE_TYPE, &["io.cilium.ingress/service-type"]),
    (
        INSECURE_NODE_PORT,
        &["io.cilium.ingress/insecure-node-port"],
    ),
    (SECURE_NODE_PORT, &["io.cilium.ingress/secure-node-port"]),
    (TLS_PASSTHROUGH, &["io.cilium.ingress/tls-passthrough"]),
    (TCP_KEEP_ALIVE, &["io.cilium/tcp-keep-alive"]),
    (TCP_KEEP_ALIVE_IDLE, &["io.cilium/tcp-keep-alive-idle"]),
    (
        TCP_KEEP_ALIVE_PROBE_INTERVAL,
        &["io.cilium/tcp-keep-alive-probe-interval"],
    ),
    (
        TCP_KEEP_ALIVE_PROBE_MAX_FAILURES,
        &["io.cilium/tcp-keep-alive-probe-max-failures"],
    ),
    (WEBSOCKET, &["io.cilium/websocket"]),
];

/// A rejected annotation value; the caller adds the Ingress identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadAnnotation {
    pub annotation: String,
    pub value: String,
    pub reason: String,
}

type Annotations = BTreeMap<String, String>;

/// The value of `key` or, failing that, of its first alias present, with
/// the key actually found (for messages).
pub(crate) fn lookup<'a>(
    annotations: Option<&'a Annotations>,
    key: &str,
) -> Option<(&'a str, &'a str)> {
    let a = annotations?;
    let aliases = ALIASES
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, a)| *a)
        .unwrap_or(&[]);
    std::iter::once(key)
        .chain(aliases.iter().copied())
        .find_map(|k| a.get_key_value(k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

fn bad(annotation: &str, value: &str, reason: impl Into<String>) -> BadAnnotation {
    BadAnnotation {
        annotation: annotation.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Go's `strconv.ParseBool` plus Cilium's `enabled`/`disabled`.
fn parse_switch(value: &str) -> Option<bool> {
    match value {
        "enabled" | "true" | "True" | "TRUE" | "t" | "T" | "1" => Some(true),
        "disabled" | "false" | "False" | "FALSE" | "f" | "F" | "0" => Some(false),
        _ => None,
    }
}

const SWITCH_VALUES: &str = "expected \"enabled\", \"disabled\", \"true\" or \"false\"";

fn switch(annotations: Option<&Annotations>, key: &str) -> Result<Option<bool>, BadAnnotation> {
    let Some((found, value)) = lookup(annotations, key) else {
        return Ok(None);
    };
    parse_switch(value)
        .map(Some)
        .ok_or_else(|| bad(found, value, SWITCH_VALUES))
}

/// A port number (Cilium parses an int32; only 1-65535 can work).
fn port(annotations: Option<&Annotations>, key: &str) -> Result<Option<u16>, BadAnnotation> {
    let Some((found, value)) = lookup(annotations, key) else {
        return Ok(None);
    };
    match value.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(Some(p as u16)),
        _ => Err(bad(found, value, "expected a port number (1-65535)")),
    }
}

fn positive(annotations: Option<&Annotations>, key: &str) -> Result<Option<i64>, BadAnnotation> {
    let Some((found, value)) = lookup(annotations, key) else {
        return Ok(None);
    };
    match value.trim().parse::<i64>() {
        Ok(n) if n > 0 && n <= i64::from(i32::MAX) => Ok(Some(n)),
        _ => Err(bad(found, value, "expected a positive whole number")),
    }
}

/// `ingress.cilium.io/force-https`: `enabled`/`true` or `disabled`/`false`
/// (also anything Go's `strconv.ParseBool` accepts). Unset gives `None`.
pub(crate) fn force_https(
    annotations: Option<&Annotations>,
) -> Result<Option<bool>, BadAnnotation> {
    switch(annotations, FORCE_HTTPS)
}

/// `ingress.cilium.io/request-timeout`: a Go duration such as `10s` or
/// `1m30s`; `0s` disables Envoy's default route timeout.
pub(crate) fn request_timeout(
    annotations: Option<&Annotations>,
) -> Result<Option<Duration>, BadAnnotation> {
    let Some((found, value)) = lookup(annotations, REQUEST_TIMEOUT) else {
        return Ok(None);
    };
    parse_go_duration(value)
        .map(Some)
        .map_err(|reason| bad(found, value, reason))
}

/// Whether `ing` asks for TLS passthrough (an invalid value counts as no;
/// translation reports it).
pub fn is_tls_passthrough(ing: &Ingress) -> bool {
    switch(ing.metadata.annotations.as_ref(), TLS_PASSTHROUGH)
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The type of the Service generated for a dedicated Ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    LoadBalancer,
    NodePort,
}

/// Settings of the generated Service (dedicated mode).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ServiceSettings {
    pub type_: ServiceType,
    pub insecure_node_port: Option<u16>,
    pub secure_node_port: Option<u16>,
    /// `Cluster` unless the annotation says `Local`.
    pub external_traffic_policy_local: bool,
    pub load_balancer_class: Option<String>,
}

/// TCP keep-alive socket options of the listener (dedicated mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    pub enabled: bool,
    pub idle: i64,
    pub interval: i64,
    pub max_failures: i64,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self {
            enabled: true,
            idle: 10,
            interval: 5,
            max_failures: 10,
        }
    }
}

/// Everything the annotations of one Ingress say.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Parsed {
    pub force_https: Option<bool>,
    pub request_timeout: Option<Duration>,
    pub tls_passthrough: bool,
    pub service: ServiceSettings,
    pub host_listener_port: Option<u16>,
    pub keep_alive: KeepAlive,
}

/// Every `ingress.cilium.io/*` key Cilium reads.
const KNOWN: &[&str] = &[
    crate::shared::LOADBALANCER_MODE,
    LOADBALANCER_CLASS,
    SERVICE_TYPE,
    SERVICE_EXTERNAL_TRAFFIC_POLICY,
    INSECURE_NODE_PORT,
    SECURE_NODE_PORT,
    HOST_LISTENER_PORT,
    TLS_PASSTHROUGH,
    FORCE_HTTPS,
    REQUEST_TIMEOUT,
    TCP_KEEP_ALIVE,
    TCP_KEEP_ALIVE_IDLE,
    TCP_KEEP_ALIVE_PROBE_INTERVAL,
    TCP_KEEP_ALIVE_PROBE_MAX_FAILURES,
    WEBSOCKET,
];

/// `ingress.cilium.io/*` keys of `annotations` that Cilium does not read
/// (typically typos): they have no effect, so they are worth a warning.
pub(crate) fn unknown_keys(annotations: Option<&Annotations>) -> Vec<&str> {
    annotations
        .into_iter()
        .flat_map(|a| a.keys())
        .map(String::as_str)
        .filter(|k| k.starts_with("ingress.cilium.io/") && !KNOWN.contains(k))
        .collect()
}

/// Parses every `ingress.cilium.io/*` annotation of `ing`; the first bad
/// value is returned.
pub(crate) fn parse(ing: &Ingress) -> Result<Parsed, BadAnnotation> {
    let a = ing.metadata.annotations.as_ref();
    for key in unknown_keys(a) {
        tracing::warn!(
            ingress = ?ing.metadata.name,
            namespace = ?ing.metadata.namespace,
            annotation = key,
            "unknown ingress.cilium.io annotation has no effect"
        );
    }
    let type_ = match lookup(a, SERVICE_TYPE) {
        None => ServiceType::LoadBalancer,
        Some((_, "LoadBalancer")) => ServiceType::LoadBalancer,
        Some((_, "NodePort")) => ServiceType::NodePort,
        Some((found, other)) => {
            return Err(bad(
                found,
                other,
                "expected \"LoadBalancer\" or \"NodePort\"",
            ));
        }
    };
    let external_traffic_policy_local = match lookup(a, SERVICE_EXTERNAL_TRAFFIC_POLICY) {
        None | Some((_, "Cluster")) => false,
        Some((_, "Local")) => true,
        Some((found, other)) => return Err(bad(found, other, "expected \"Cluster\" or \"Local\"")),
    };
    let load_balancer_class = match lookup(a, LOADBALANCER_CLASS) {
        None => None,
        Some((found, v)) if v.trim().is_empty() => {
            return Err(bad(found, v, "must not be empty"));
        }
        Some((_, v)) => Some(v.to_string()),
    };
    let defaults = KeepAlive::default();
    let keep_alive = KeepAlive {
        enabled: switch(a, TCP_KEEP_ALIVE)?.unwrap_or(defaults.enabled),
        idle: positive(a, TCP_KEEP_ALIVE_IDLE)?.unwrap_or(defaults.idle),
        interval: positive(a, TCP_KEEP_ALIVE_PROBE_INTERVAL)?.unwrap_or(defaults.interval),
        max_failures: positive(a, TCP_KEEP_ALIVE_PROBE_MAX_FAILURES)?
            .unwrap_or(defaults.max_failures),
    };
    // Validated only: upgrades to WebSocket are always allowed, as in
    // current Cilium, whose listeners always carry the upgrade config.
    switch(a, WEBSOCKET)?;
    Ok(Parsed {
        force_https: force_https(a)?,
        request_timeout: request_timeout(a)?,
        tls_passthrough: switch(a, TLS_PASSTHROUGH)?.unwrap_or(false),
        service: ServiceSettings {
            type_,
            insecure_node_port: port(a, INSECURE_NODE_PORT)?,
            secure_node_port: port(a, SECURE_NODE_PORT)?,
            external_traffic_policy_local,
            load_balancer_class,
        },
        host_listener_port: port(a, HOST_LISTENER_PORT)?,
        keep_alive,
    })
}

/// Parses Go's `time.ParseDuration` syntax (`300ms`, `1.5h`, `2h45m`), minus
/// negative values, which make no sense as a timeout.
pub(crate) fn parse_go_duration(input: &str) -> Result<Duration, String> {
    let mut s = input.trim();
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    } else if s.starts_with('-') {
        return Err("must not be negative".to_string());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".to_string());
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let int_part = &s[start..i];
        let mut frac_part = "";
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let fstart = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            frac_part = &s[fstart..i];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err("expected a number (e.g. 10s, 1m30s)".to_string());
        }
        let ustart = i;
        while i < bytes.len() && !bytes[i].is_ascii_digit() && bytes[i] != b'.' {
            i += 1;
        }
        let unit_ns: u128 = match &s[ustart..i] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err("missing unit (one of ns, us, ms, s, m, h)".to_string()),
            other => return Err(format!("unknown unit {other:?}")),
        };
        let overflow = || "duration too large".to_string();
        let int_value: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        total = int_value
            .checked_mul(unit_ns)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            // Digits beyond nanosecond precision cannot change the result.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| overflow())?;
            let scale = 10u128.pow(digits.len() as u32);
            total = total
                .checked_add(frac * unit_ns / scale)
                .ok_or_else(overflow)?;
        }
    }
    let secs =
        u64::try_from(total / 1_000_000_000).map_err(|_| "duration too large".to_string())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a duration the way protojson writes `google.protobuf.Duration`:
/// seconds with 0, 3, 6 or 9 fractional digits and an `s` suffix.
pub(crate) fn protojson_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{secs}s")
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{secs}.{:03}s", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{secs}.{:06}s", nanos / 1_000)
    } else {
        format!("{secs}.{nanos:09}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ann(k: &str, v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(k.to_string(), v.to_string())])
    }

    #[test]
    fn go_durations() {
        let ok = [
            ("10s", Duration::from_secs(10)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("2h45m", Duration::from_secs(2 * 3600 + 45 * 60)),
            ("300ms", Duration::from_millis(300)),
            ("1.5s", Duration::from_millis(1500)),
            (".5m", Duration::from_secs(30)),
            ("1us", Duration::from_micros(1)),
            ("1µs", Duration::from_micros(1)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("+5s", Duration::from_secs(5)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_go_duration(input), Ok(want), "{input}");
        }
        for bad in [
            "",
            "10",
            "abc",
            "10x",
            "-1s",
            "s",
            ".s",
            "1.2.3s",
            "99999999999999999999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn protojson_durations() {
        assert_eq!(protojson_duration(Duration::from_secs(90)), "90s");
        assert_eq!(protojson_duration(Duration::ZERO), "0s");
        assert_eq!(protojson_duration(Duration::from_millis(1500)), "1.500s");
        assert_eq!(protojson_duration(Duration::from_micros(1)), "0.000001s");
        assert_eq!(protojson_duration(Duration::from_nanos(7)), "0.000000007s");
    }

    #[test]
    fn force_https_values() {
        assert_eq!(force_https(None), Ok(None));
        for v in ["enabled", "true"] {
            assert_eq!(force_https(Some(&ann(FORCE_HTTPS, v))), Ok(Some(true)));
        }
        for v in ["disabled", "false"] {
            assert_eq!(force_https(Some(&ann(FORCE_HTTPS, v))), Ok(Some(false)));
        }
        let err = force_https(Some(&ann(FORCE_HTTPS, "yes-please"))).unwrap_err();
        assert_eq!(err.annotation, FORCE_HTTPS);
        assert_eq!(err.value, "yes-please");
    }

    #[test]
    fn primary_key_wins_over_alias_and_aliases_are_read() {
        let both = BTreeMap::from([
            (TLS_PASSTHROUGH.to_string(), "disabled".to_string()),
            (
                "io.cilium.ingress/tls-passthrough".to_string(),
                "enabled".to_string(),
            ),
        ]);
        assert_eq!(switch(Some(&both), TLS_PASSTHROUGH), Ok(Some(false)));
        let alias = ann("io.cilium/tcp-keep-alive-idle", "42");
        assert_eq!(positive(Some(&alias), TCP_KEEP_ALIVE_IDLE), Ok(Some(42)));
        // An error names the key actually found.
        let bad = ann("io.cilium/tcp-keep-alive-idle", "x");
        let e = positive(Some(&bad), TCP_KEEP_ALIVE_IDLE).unwrap_err();
        assert_eq!(e.annotation, "io.cilium/tcp-keep-alive-idle");
    }

    #[test]
    fn unknown_keys_are_found() {
        let a = BTreeMap::from([
            (FORCE_HTTPS.to_string(), "true".to_string()),
            (
                "ingress.cilium.io/force-http".to_string(),
                "true".to_string(),
            ),
            ("example.com/x".to_string(), "1".to_string()),
        ]);
        assert_eq!(unknown_keys(Some(&a)), vec!["ingress.cilium.io/force-http"]);
    }

    #[test]
    fn request_timeout_values() {
        assert_eq!(request_timeout(Some(&BTreeMap::new())), Ok(None));
        assert_eq!(
            request_timeout(Some(&ann(REQUEST_TIMEOUT, "1m30s"))),
            Ok(Some(Duration::from_secs(90)))
        );
        let err = request_timeout(Some(&ann(REQUEST_TIMEOUT, "ten seconds"))).unwrap_err();
        assert_eq!(err.annotation, REQUEST_TIMEOUT);
    }
}
