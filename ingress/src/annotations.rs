//! The `ingress.cilium.io/*` annotations that change the translation.

use std::time::Duration;

/// Overrides `enforce_https_default` for the TLS hosts of one Ingress.
pub const FORCE_HTTPS: &str = "ingress.cilium.io/force-https";
/// Route timeout for every backend route of one Ingress (a Go duration).
pub const REQUEST_TIMEOUT: &str = "ingress.cilium.io/request-timeout";

/// A rejected annotation value; the caller adds the Ingress identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadAnnotation {
    pub annotation: &'static str,
    pub value: String,
    pub reason: String,
}

fn get<'a>(
    annotations: Option<&'a std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    annotations.and_then(|a| a.get(key)).map(String::as_str)
}

/// `ingress.cilium.io/force-https`: `enabled`/`true` or `disabled`/`false`
/// (also anything Go's `strconv.ParseBool` accepts). Unset gives `None`.
/// Cilium silently ignores other values; we reject them so the user learns
/// the redirect is not what they asked for.
pub(crate) fn force_https(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<Option<bool>, BadAnnotation> {
    let Some(value) = get(annotations, FORCE_HTTPS) else {
        return Ok(None);
    };
    match value {
        "enabled" | "true" | "True" | "TRUE" | "t" | "T" | "1" => Ok(Some(true)),
        "disabled" | "false" | "False" | "FALSE" | "f" | "F" | "0" => Ok(Some(false)),
        other => Err(BadAnnotation {
            annotation: FORCE_HTTPS,
            value: other.to_string(),
            reason: "expected \"enabled\", \"disabled\", \"true\" or \"false\"".to_string(),
        }),
    }
}

/// `ingress.cilium.io/request-timeout`: a Go duration such as `10s` or
/// `1m30s`; `0s` disables Envoy's default route timeout.
pub(crate) fn request_timeout(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<Option<Duration>, BadAnnotation> {
    let Some(value) = get(annotations, REQUEST_TIMEOUT) else {
        return Ok(None);
    };
    parse_go_duration(value)
        .map(Some)
        .map_err(|reason| BadAnnotation {
            annotation: REQUEST_TIMEOUT,
            value: value.to_string(),
            reason,
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
