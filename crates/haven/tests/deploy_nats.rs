//! The sample NATS configurations shipped in `deploy/nats/` are valid for the installed
//! nats-server (its configuration test mode, `-t`), and the cluster one, with its hosts,
//! ports and store directory rewritten to loopback, forms a JetStream cluster that a Haven
//! node with three stream replicas runs on.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Haven, free_port};
use haven_testkit::{Process, free_ports, http_status, tools_dir, wait_until};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats")
}

fn nats_server() -> PathBuf {
    tools_dir().join("venv/bin/nats-server")
}

#[test]
fn every_shipped_configuration_passes_the_configuration_test() {
    let mut files = Vec::new();
    for sub in ["cluster", "regions/eu", "regions/us"] {
        for i in 1..=3 {
            files.push(deploy_dir().join(sub).join(format!("nats-{i}.conf")));
        }
    }
    for f in &files {
        let out = Command::new(nats_server())
            .arg("-t")
            .arg("-c")
            .arg(f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The test mode does find errors (so the passes above mean something).
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.conf");
    std::fs::write(&bad, "jetstream { sync_interval: sometimes }\n").unwrap();
    let out = Command::new(nats_server())
        .arg("-t")
        .arg("-c")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// `text` with `from` replaced by `to`; panics when `from` is not in it (the shipped file
/// changed and this test must follow).
fn rewrite(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in:\n{text}");
    text.replace(from, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cluster_configuration_runs_a_haven_node_with_three_replicas() {
    let common = std::fs::read_to_string(deploy_dir().join("cluster/haven-cluster.conf")).unwrap();
    assert!(common.contains("sync_interval: always"));
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(9);
    let (client, rest) = ports.split_at(3);
    let (route, http) = rest.split_at(3);
    let mut servers = Vec::new();
    for i in 0..3 {
        // Each server in a directory of its own: its copy of the common file, on its ports.
        let sdir = dir.path().join(format!("nats-{}", i + 1));
        std::fs::create_dir_all(&sdir).unwrap();
        let mut text = rewrite(
            &common,
            "listen: 0.0.0.0:4222",
            &format!("listen: 127.0.0.1:{}", client[i]),
        );
        text = rewrite(
            &text,
            "http: 0.0.0.0:8222",
            &format!("http: 127.0.0.1:{}", http[i]),
        );
        text = rewrite(
            &text,
            "listen: 0.0.0.0:6222",
            &format!("listen: 127.0.0.1:{}", route[i]),
        );
        text = rewrite(
            &text,
            "store_dir: /var/lib/nats",
            &format!("store_dir: \"{}\"", sdir.join("js").display()),
        );
        for (j, port) in route.iter().enumerate() {
            text = rewrite(
                &text,
                &format!("nats-route://nats-{}:6222", j + 1),
                &format!("nats-route://127.0.0.1:{port}"),
            );
        }
        std::fs::write(sdir.join("haven-cluster.conf"), text).unwrap();
        let own = format!("nats-{}.conf", i + 1);
        std::fs::copy(deploy_dir().join("cluster").join(&own), sdir.join(&own)).unwrap();
        servers.push(Process(
            Command::new(nats_server())
                .arg("-c")
                .arg(sdir.join(&own))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(sdir.join("log")).unwrap())
                .spawn()
                .unwrap(),
        ));
    }
    for (i, port) in http.iter().enumerate() {
        let healthy = wait_until(
            Duration::from_secs(90),
            Duration::from_millis(100),
            || async { http_status(*port, "/healthz?js-enabled-only=true").await == Some(200) },
        )
        .await;
        assert!(
            healthy,
            "nats-{} did not become healthy: {}",
            i + 1,
            std::fs::read_to_string(dir.path().join(format!("nats-{}/log", i + 1)))
                .unwrap_or_default()
        );
    }
    let store = client
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let data = dir.path().join("node0");
    let node = Haven::start(
        &data,
        free_port(),
        "default",
        &["--store", &store, "--region", "r1", "--store-replicas", "3"],
    )
    .await;
    let st = node.status().await;
    assert_eq!(st["store"]["replicas"], 3, "{st}");
    assert_eq!(
        st["store"]["peers"].as_array().map(Vec::len),
        Some(2),
        "{st}"
    );
    drop(node);
    drop(servers);
}
