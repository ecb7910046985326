//! What a node writes to its log: plain text when the log goes to a file, one line per
//! change of an upstream's state rather than one per reconnect attempt, and nothing left to
//! clean up after a clean stop.

mod common;

use common::{Haven, Legacy, free_port};
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
