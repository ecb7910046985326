//! `haven drill`: every drill runs in a short form on a local deployment (real nats-servers,
//! Haven nodes of this binary, HAProxy), and its report's figures and the exit status are
//! checked. The targets themselves are judged by the drill (its pass or fail), not here.

use std::path::Path;
use std::process::{Command, Output};

fn haven(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(args)
        .env("HAVEN_LOG", "warn")
        .output()
        .expect("running haven")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn reports(dir: &Path) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            for f in ["report.md", "timeline.svg"] {
                assert!(p.join(f).is_file(), "{} has no {f}", p.display());
            }
            serde_json::from_str(&std::fs::read_to_string(p.join("report.json")).unwrap()).unwrap()
        })
        .collect();
    out.sort_by_key(|r| r["started_unix"].as_u64());
    out
}

#[test]
fn the_list_names_every_drill_with_its_targets() {
    let o = haven(&["drill", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for name in [
        "process-crash",
        "node-loss",
        "nats-loss",
        "store-outage",
        "switchover",
        "config-push",
        "key-rotation",
    ] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
    assert!(
        out.contains("15m"),
        "the design's RTO floor is shown:\n{out}"
    );
}

#[test]
fn bad_requests_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("r");
    let r = reports.to_str().unwrap();
    let o = haven(&["drill", "run", "no-such-drill", "--local", "--reports", r]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no drill named 'no-such-drill'"),
        "{}",
        text(&o)
    );
    let o = haven(&["drill", "run", "process-crash", "--reports", r]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--local"), "{}", text(&o));
    let o = haven(&[
        "drill",
        "run",
        "process-crash",
        "--local",
        "--rate",
        "0",
        "--reports",
        r,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = haven(&[
        "drill",
        "run",
        "process-crash",
        "--local",
        "--nats-server",
        "/nonexistent/nats-server",
        "--reports",
        r,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("nats-server not found"), "{}", text(&o));
    assert!(!reports.exists(), "a refused drill writes no report");
    let o = haven(&["drill", "history", "--reports", r]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no drill reports"));
}

#[test]
fn every_drill_runs_on_a_local_deployment_and_reports_what_clients_saw() {
    let tools = haven_testkit::tools_dir();
    let nats = tools.join("venv/bin/nats-server");
    let dir = tempfile::tempdir().unwrap();
    let reports_dir = dir.path().join("reports");
    let o = haven(&[
        "drill",
        "run",
        "all",
        "--local",
        "--nats-server",
        nats.to_str().unwrap(),
        "--warmup",
        "2",
        "--after",
        "3",
        "--outage",
        "2",
        "--rate",
        "20",
        "--long-seconds",
        "2",
        "--reports",
        reports_dir.to_str().unwrap(),
    ]);
    let out = text(&o);
    // The exit status matches the reports' verdicts.
    let all = reports(&reports_dir);
    assert_eq!(all.len(), 7, "{out}");
    let passed = all.iter().all(|r| r["passed"] == true);
    assert_eq!(o.status.code(), Some(if passed { 0 } else { 1 }), "{out}");
    for r in &all {
        let name = r["scenario"].as_str().unwrap();
        // Load ran through the load balancer, and writes were acknowledged and read back.
        assert!(r["requests"].as_u64().unwrap() > 10, "{name}: {r:#}");
        assert!(
            r["rpo"]["acknowledged"].as_u64().unwrap() > 0,
            "{name}: {r:#}"
        );
        assert!(
            r["exactly_once"]["calls"].as_u64().unwrap() > 0,
            "{name}: {r:#}"
        );
        // Every figure is consistent with the verdict.
        let findings = r["findings"].as_array().unwrap();
        assert_eq!(r["passed"] == true, findings.is_empty(), "{name}: {r:#}");
        if r["rpo"]["missing"].as_u64().unwrap() > 0 {
            assert!(
                findings
                    .iter()
                    .any(|f| f.as_str().unwrap().contains("writes lost"))
            );
        }
        // Each drill broke something and repaired it, both marked on the timeline.
        let marks = r["marks"].as_array().unwrap();
        assert!(marks.iter().any(|m| m["kind"] == "fault"), "{name}: {r:#}");
        assert!(marks.iter().any(|m| m["kind"] == "repair"), "{name}: {r:#}");
        assert!(!r["timeline"].as_array().unwrap().is_empty());
        assert_eq!(r["components"][0]["component"], "load balancer", "{name}");
    }
    let by_name = |n: &str| all.iter().find(|r| r["scenario"] == n).unwrap();
    // The measured propagations are reported as the configuration and secrets rows.
    let row = |r: &serde_json::Value, c: &str| {
        r["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["component"] == c)
            .cloned()
            .unwrap()
    };
    assert!(
        row(by_name("config-push"), "configuration")["measured_by"]
            .as_str()
            .unwrap()
            .contains("in force")
    );
    assert!(
        row(by_name("key-rotation"), "secrets")["measured_by"]
            .as_str()
            .unwrap()
            .contains("signs with the new key")
    );
    // A store outage makes clients fail for a while: the drill saw it.
    assert!(
        by_name("store-outage")["failed"].as_u64().unwrap() > 0,
        "{out}"
    );

    // History lists every drill and a summary per scenario.
    let o = haven(&[
        "drill",
        "history",
        "--reports",
        reports_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("store-outage") && table.contains("mean RTO"),
        "{table}"
    );
    let o = haven(&[
        "drill",
        "history",
        "--json",
        "--reports",
        reports_dir.to_str().unwrap(),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 7);
}
