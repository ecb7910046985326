//! A node whose NATS store is misconfigured stops at start with the cause and the fix:
//! nothing listening, a single server asked for replicas, a server without JetStream.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TEST_SECRETS_KEYS, free_port, haven_bin};
use haven_testkit::{Process, tools_dir, wait_listening};

/// Runs `haven serve` on `store` with `extra` and waits for it to exit (killing it after a
/// minute, far beyond the few seconds a refusal takes, so that a hang fails instead of
/// blocking); its exit status and its log.
async fn serve_exits(store: &str, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("haven.log");
    let mut child = Command::new(haven_bin())
        .env("HAVEN_SECRETS_KEYS", TEST_SECRETS_KEYS)
        .env("HAVEN_LOG", "info")
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data")
        .arg(dir.path().join("data"))
        .args(["--catalog", "default", "--store", store, "--region", "r1"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "haven did not exit; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (status, std::fs::read_to_string(&log).unwrap())
}

/// One nats-server on a free loopback port, JetStream on when `jetstream`.
async fn nats_server(jetstream: bool) -> (Process, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(tools_dir().join("venv/bin/nats-server"));
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-n", "solo"]);
    if jetstream {
        cmd.arg("-js").arg("-sd").arg(dir.path().join("js"));
    }
    let p = Process(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_listening(port, Duration::from_secs(20)).await,
        "nats-server did not listen"
    );
    (p, port, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_named_as_a_refused_connection() {
    // A port nobody listens on (taken, then freed).
    let port = free_port();
    let (status, log) = serve_exits(&format!("nats://127.0.0.1:{port}"), &[]).await;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "cannot connect to NATS at nats://127.0.0.1:{port}: connection refused"
        )) && log.contains("is nats-server running"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_server_asked_for_three_replicas_names_store_replicas_1() {
    let (_nats, port, _dir) = nats_server(true).await;
    let (status, log) = serve_exits(&format!("nats://127.0.0.1:{port}"), &[]).await;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("the NATS server solo at")
            && log.contains("is not clustered")
            && log.contains("use --store-replicas 1")
            && log.contains("scripts/nats-cluster"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jetstream_names_the_js_flag() {
    let (_nats, port, _dir) = nats_server(false).await;
    let (status, log) = serve_exits(
        &format!("nats://127.0.0.1:{port}"),
        &["--store-replicas", "1"],
    )
    .await;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("JetStream is not enabled on the NATS server solo at")
            && log.contains("start nats-server with -js"),
        "{log}"
    );
}
