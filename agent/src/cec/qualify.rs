//! Resource names inside a CEC are local to it; Cilium prefixes them with
//! `<namespace>/<cec-name>/` so configs never collide. Names that already
//! contain a `/` are taken as qualified (e.g. EDS service names
//! `<ns>/<svc>:<port>` and SDS names `<secrets-ns>/<secret>`).

/// Qualify `name` for the CEC `namespace`/`cec` (`namespace` is empty for a
/// clusterwide config).
pub fn qualify(namespace: &str, cec: &str, name: &str) -> String {
    if name.is_empty() || name.contains('/') {
        name.to_owned()
    } else {
        format!("{namespace}/{cec}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::qualify;

    #[test]
    fn qualifies_local_names_only() {
        assert_eq!(qualify("ns", "cec", "listener"), "ns/cec/listener");
        assert_eq!(qualify("ns", "cec", "ns:svc:80"), "ns/cec/ns:svc:80");
        assert_eq!(qualify("ns", "cec", "ns/svc:80"), "ns/svc:80");
        assert_eq!(qualify("", "ccec", "l"), "/ccec/l");
        assert_eq!(qualify("ns", "cec", ""), "");
    }
}
