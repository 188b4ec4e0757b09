//! Real Envoy NACKs a CEC (its listener address is taken by another
//! process). Membrane pins the NACK on that CEC, quarantines it, reports it,
//! does not resend it, and a sibling's updates keep landing.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_nacked_cec_is_quarantined_and_siblings_keep_updating() {
    let m = Membrane::start("127.0.105.0/24", 28580, 28581);
    m.apply(&direct_cec("sibling", 28911, "v1", "filterChains"));
    assert!(
        wait_until(Duration::from_secs(10), || body_at(28911).as_deref()
            == Some("v1")),
        "{}",
        m.log()
    );

    // Another process holds the port: Envoy cannot bind and NACKs.
    let _taken = std::net::TcpListener::bind("127.0.0.1:28912").expect("hold port");
    m.apply(&direct_cec("victim", 28912, "never", "filterChains"));
    let mut rejected = Vec::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            rejected = m.rejected();
            rejected.iter().any(|(o, r)| {
                o == "CiliumEnvoyConfig default/victim"
                    && r.contains("Envoy rejected its Listener")
                    && r.contains("28912")
            })
        }),
        "NACK not pinned on the CEC: {rejected:#?}\n{}",
        m.log()
    );
    assert!(
        !rejected.iter().any(|(o, _)| o.contains("sibling")),
        "the sibling was blamed: {rejected:#?}"
    );

    // The sibling still updates.
    m.apply(&direct_cec("sibling", 28911, "v2", "filterChains"));
    assert!(
        wait_until(Duration::from_secs(10), || body_at(28911).as_deref()
            == Some("v2")),
        "{}",
        m.log()
    );

    // Envoy converged on a config it accepts; the bad version is not resent.
    let converged = wait_until(Duration::from_secs(10), || {
        let status = m.status();
        let lds = &status["xds"]["streams"][0]["types"]["type.googleapis.com/envoy.config.listener.v3.Listener"];
        lds["rejected"] == false && lds["sent_version"] == lds["acked_version"]
    });
    assert!(converged, "LDS did not converge: {:#}", m.status()["xds"]);
    assert_eq!(m.status()["metrics"]["nacks_isolated_total"], 1);

    // Fixing the CEC (a free port) lifts the quarantine.
    m.apply(&direct_cec("victim", 28913, "fixed", "filterChains"));
    assert!(
        wait_until(Duration::from_secs(10), || body_at(28913).as_deref()
            == Some("fixed")),
        "{}",
        m.log()
    );
    assert!(
        !m.rejected()
            .iter()
            .any(|(o, _)| o == "CiliumEnvoyConfig default/victim")
    );
}
