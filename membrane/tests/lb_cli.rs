//! `membrane lb maglev` reproduces the check vector of the Maglev issue.

use std::process::Command;

const CHECK: &str = "2(2),1(2),2(1),3(1),2(2),1(1),3(3),2(2),3(1),1(3),3(1),2(2),3(1),1(1),3(1),1(1),2(3),1(3),3(1),2(1),3(2),1(1),2(1),1(1),2(2),3(1),2(1),1(3),2(1),3(4),1(1),2(1),1(2),2(2),1(2),2(1),3(3),1(2),2(1),1(1),2(2),3(1),1(2),3(4),2(1),1(1),2(1),1(1),2(2),3(2),1(1),3(3),1(1),2(3),1(1),2(2),3(2),1(2),3(2),1(1),2(2),1(2),2(1),3(3),2(1),1(1),3(1),2(1),1(1),2(2),3(1),1(1),2(1),3(2),2(1),3(1),1(1),3(1),1(2),2(2),3(1),1(1),2(1),1(1),3(1),2(1),3(2),1(3),2(1),1(1),3(1),2(2),1(1),3(1),2(1),3(2),2(1),1(2),2(1),1(1),2(2),1(2),3(3),2(2),1(2),2(1),1(1),2(2),3(1),1(1),3(3),2(3),1(3),2(2),3(1),1(1),2(1),3(2),2(1),1(1),2(1),1(3),2(1),3(3),2(1),3(1),1(1),2(1),1(1),2(2),1(2),2(1),3(5),1(3),2(2),1(2),2(1),3(4),1(4),2(1),3(2),1(1),2(1),3(2),2(1),3(1),2(1),1(3),2(1),3(2),2(1),1(1),3(3),2(1)";

fn membrane(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(args)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn maglev_rle_matches_the_check_vector() {
    let (ok, out, err) = membrane(&[
        "lb",
        "maglev",
        "-m",
        "251",
        "--format",
        "rle",
        "10.0.0.1:80",
        "10.0.0.2:80",
        "10.0.0.3:80",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), CHECK);
}

#[test]
fn maglev_list_prints_one_backend_per_slot() {
    let (ok, out, err) = membrane(&[
        "lb",
        "maglev",
        "-m",
        "251",
        "10.0.0.1:80",
        "10.0.0.2:80",
        "10.0.0.3:80",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 251);
    // The run-length form starts 2(2),1(2): slots 0-1 are backend 2, 2-3 backend 1.
    assert_eq!(
        &lines[..4],
        ["10.0.0.2:80", "10.0.0.2:80", "10.0.0.1:80", "10.0.0.1:80"]
    );
}

#[test]
fn maglev_rejects_a_table_size_cilium_does_not_use() {
    let (ok, _, err) = membrane(&["lb", "maglev", "-m", "250", "10.0.0.1:80"]);
    assert!(!ok);
    assert!(err.contains("251") && err.contains("131071"), "{err}");
}
