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

/// One nats-server with JetStream and a monitoring port, `sync_interval: always` when
/// `always`; its client port and monitoring port.
async fn monitored_server(always: bool) -> (Process, u16, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ports = haven_testkit::free_ports(2);
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "server_name: solo\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\"{} }}\n",
            ports[0],
            ports[1],
            dir.path().join("js").display(),
            if always { ", sync_interval: always" } else { "" }
        ),
    )
    .unwrap();
    let p = Process(
        Command::new(tools_dir().join("venv/bin/nats-server"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        haven_testkit::wait_for_status(
            ports[1],
            "/healthz?js-enabled-only=true",
            Duration::from_secs(30)
        )
        .await,
        "nats-server did not become healthy"
    );
    (p, ports[0], ports[1], dir)
}

/// Starts a node on the server with `--nats-monitor`; its status JSON, `haven status` text
/// and log.
async fn node_with_monitor(client: u16, monitor: u16) -> (serde_json::Value, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = common::Haven::start(
        &data,
        free_port(),
        "default",
        &[
            "--store",
            &format!("nats://127.0.0.1:{client}"),
            "--region",
            "r1",
            "--store-replicas",
            "1",
            "--nats-monitor",
            &format!("http://127.0.0.1:{monitor}"),
        ],
    )
    .await;
    let st = node.status().await;
    let out = Command::new(haven_bin())
        .args([
            "status",
            "--node",
            &format!("http://127.0.0.1:{}", node.port),
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = std::fs::read_to_string(&node.log).unwrap();
    (st, text, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_sync_every_write_is_warned_about() {
    let (_nats, client, monitor, _dir) = monitored_server(false).await;
    let (st, text, log) = node_with_monitor(client, monitor).await;
    assert_eq!(st["store"]["sync"]["checked"], true, "{st}");
    assert_eq!(st["store"]["sync"]["sync_always"], false, "{st}");
    assert_eq!(st["store"]["sync"]["servers"][0]["server"], "solo", "{st}");
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("does not sync every write to disk")),
        "{log}"
    );
    assert!(
        text.contains("WARNING: not every write is synced to disk on solo"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_syncs_every_write_is_not_warned_about() {
    let (_nats, client, monitor, _dir) = monitored_server(true).await;
    let (st, text, log) = node_with_monitor(client, monitor).await;
    assert_eq!(st["store"]["sync"]["sync_always"], true, "{st}");
    assert!(!log.contains("does not sync every write"), "{log}");
    assert!(
        text.contains("sync to disk: every write, on all 1 servers checked"),
        "{text}"
    );
}
