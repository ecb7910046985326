//! What a node writes to its log: plain text when the log goes to a file, one line per
//! change of an upstream's state rather than one per reconnect attempt, and nothing left to
//! clean up after a clean stop.

mod common;

use common::{Haven, Home, Legacy, free_port};
use std::time::Duration;

/// With stderr going to a file (not a terminal), no line carries an ANSI escape code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_to_a_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    // Some traffic, so that there are lines of several levels and targets.
    let c = Legacy::connect(&h.url()).await;
    let _ = c.request(2, "tools/list", serde_json::json!({})).await;
    assert!(
        h.terminate(Duration::from_secs(30)).await,
        "haven did not stop"
    );
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(
        log.lines().count() > 2,
        "too few log lines to judge:\n{log}"
    );
    assert!(!log.contains("\x1b["), "colour codes in a log file:\n{log}");
}

/// `haven registry add --data DATA ARGS...`, which must succeed.
fn registry_add(data: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new(common::haven_bin())
        .args(["registry", "add", "--data"])
        .arg(data)
        .args(args)
        .env_remove("HAVEN_ADMIN_TOKEN")
        .env_remove("HAVEN_NODE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "registry add {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The restart counter of upstream `name` in the node's admin status.
async fn restarts(h: &Haven, name: &str) -> u64 {
    let v = h.admin_get(&format!("/admin/v1/registry/{name}")).await;
    v["status"]["restarts"].as_u64().unwrap_or(0)
}

/// Waits (bounded) until upstream `name` has been restarted at least `n` times.
async fn wait_restarts(h: &Haven, name: &str, n: u64) {
    let ok = haven_testkit::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async { restarts(h, name).await >= n },
    )
    .await;
    assert!(
        ok,
        "{name} was not restarted {n} times: {}",
        h.admin_get(&format!("/admin/v1/registry/{name}")).await
    );
}

/// The node's log lines about upstream `name`.
fn lines_about(h: &Haven, name: &str) -> Vec<String> {
    let needle = format!("upstream=\"{name}\"");
    std::fs::read_to_string(&h.log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// An upstream whose endpoint is dead is retried again and again (each retry counted as a
/// restart), but the log says so a few times, not once per attempt: a line when it starts
/// failing, and the same failure again only every few minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_logs_its_state_changes_not_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let h = Haven::start(&data, free_port(), "default", &[]).await;
    h.set_setting("upstream.restart_max_backoff_ms", serde_json::json!(100))
        .await;
    // A port nothing listens on.
    let dead = format!("http://127.0.0.1:{}/mcp", free_port());
    registry_add(&data, &["dead", "--url", &dead]);
    // A stdio upstream that writes to stderr and exits before answering.
    let script = dir.path().join("exits.py");
    std::fs::write(
        &script,
        "import sys\nsys.stderr.write('starting up\\nfatal: no config\\n')\nsys.exit(3)\n",
    )
    .unwrap();
    registry_add(&data, &["exits", "--", "python3", script.to_str().unwrap()]);
    wait_restarts(&h, "dead", 20).await;
    wait_restarts(&h, "exits", 20).await;
    for name in ["dead", "exits"] {
        let lines = lines_about(&h, name);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("connecting to upstream failed")),
            "the first failure of {name} is not logged:\n{}",
            lines.join("\n")
        );
        assert!(
            lines.len() <= 4,
            "{} lines about {name} over 20 attempts:\n{}",
            lines.len(),
            lines.join("\n")
        );
    }
}

/// A clean stop (SIGTERM) leaves nothing for the next start to clean up: the standalone GET
/// streams its clients had open are not "interrupted requests" settled at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_no_standalone_stream_to_settle() {
    let home = Home::new();
    let mut h = home.start("default", &["--drain-timeout", "5s"]).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let c = Legacy::connect(&h.url()).await;
        let r = c.open_standalone().await;
        assert_eq!(r.status(), 200);
        streams.push((c, r));
    }
    assert!(
        h.terminate(Duration::from_secs(30)).await,
        "haven did not stop"
    );
    drop(streams);
    let stopped = std::fs::read_to_string(&h.log).unwrap().len();
    drop(h);
    let mut h = home.start("default", &[]).await;
    // The next start's recovery scan has run once readyz is green; a request of its own
    // makes sure the node is serving.
    let c = Legacy::connect(&h.url()).await;
    let _ = c.request(2, "tools/list", serde_json::json!({})).await;
    assert!(
        h.terminate(Duration::from_secs(30)).await,
        "haven did not stop"
    );
    let log = std::fs::read_to_string(&h.log).unwrap();
    let after = &log[stopped..];
    for needle in [
        "ended the stream of an interrupted request",
        "settled work left by processes that are gone",
    ] {
        assert!(
            !after.contains(needle),
            "{needle:?} after a clean stop:\n{log}"
        );
    }
}
