//! The audit log with the real binary: control-plane changes through the CLI appear in
//! `haven audit list` with their outcome, refused admin tokens and (with `audit.tool_calls`)
//! tool calls are recorded, a secret's value appears nowhere in `haven audit export`, the log
//! survives a backup and a restore and verifies there against the original node's pinned key,
//! and a byte changed in the restored store's redb file (through the store's own write API,
//! with the node stopped) is named by `haven audit verify`; three nodes of a NATS cluster
//! write their own chains at once and every node verifies all of them.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Haven, free_port, stateless, write_key_file};
use haven_state::{Batch, HybridClock, Origin, RedbStore, Store};
use serde_json::{Value, json};

/// Runs `haven ARGS... --data DATA`; returns (exit code, stdout, stderr).
fn haven(data: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::haven_bin())
        .args(args)
        .arg("--data")
        .arg(data)
        .env_remove("HAVEN_ADMIN_TOKEN")
        .env_remove("HAVEN_NODE")
        .output()
        .expect("running haven");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(data: &Path, args: &[&str]) -> String {
    let (code, out, err) = haven(data, args);
    assert_eq!(code, 0, "haven {args:?}: {out}{err}");
    out
}

/// `haven audit list --json` records (with extra filter arguments).
fn list(data: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "list", "--json"];
    args.extend(extra);
    let v: Value = serde_json::from_str(&ok(data, &args)).unwrap();
    v["records"].as_array().unwrap().clone()
}

/// The records of `haven audit list` with `extra`, after `haven audit checkpoint`, which
/// commits every event the node queued before it: what a request recorded before its answer
/// is listed, with no waiting.
fn flushed(data: &Path, extra: &[&str]) -> Vec<Value> {
    ok(data, &["audit", "checkpoint"]);
    list(data, extra)
}

fn actions(records: &[Value]) -> Vec<(String, String, String, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["principal"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
                r["target"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_changes_are_audited_backed_up_restored_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");
    let key = dir.path().join("backup.key");
    let out = Command::new(common::haven_bin())
        .args(["backup", "keygen", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bk = key.to_str().unwrap();
    let bu = backup.to_str().unwrap();
    let backup_args = ["--backup-url", bu, "--backup-key-file", bk];
    let mut h = Haven::start(&data, free_port(), "default", &backup_args).await;

    // Control-plane changes through the CLI, one refused.
    const SECRET: &str = "s3cr3t-VALUE-that-must-never-appear-9f8e7d";
    let value_file = dir.path().join("value");
    write_key_file(&value_file, SECRET);
    ok(
        &data,
        &[
            "secrets",
            "set",
            "gh_token",
            "--value-file",
            value_file.to_str().unwrap(),
        ],
    );
    ok(&data, &["config", "set", "limits.max_notes", "500"]);
    let (code, _, _) = haven(&data, &["config", "set", "limits.max_notes", "many"]);
    assert_ne!(code, 0);
    ok(&data, &["config", "unset", "limits.max_notes"]);
    ok(&data, &["secrets", "rotate-key"]);
    ok(&data, &["secrets", "delete", "gh_token"]);
    ok(
        &data,
        &[
            "secrets",
            "set",
            "gh_token",
            "--value-file",
            value_file.to_str().unwrap(),
        ],
    );

    let got = actions(&list(&data, &[]));
    let want = [
        ("admin-token", "secrets.set", "secret:gh_token", "ok"),
        (
            "admin-token",
            "config.set",
            "setting:limits.max_notes",
            "ok",
        ),
        (
            "admin-token",
            "config.unset",
            "setting:limits.max_notes",
            "ok",
        ),
        ("admin-token", "secrets.rotate_key", "keys", "ok"),
        ("admin-token", "secrets.delete", "secret:gh_token", "ok"),
    ];
    for w in want {
        let w = (w.0.into(), w.1.into(), w.2.into(), w.3.into());
        assert!(got.contains(&w), "{w:?} not in {got:#?}");
    }
    // The refused change is there with its outcome (the CLI checks some values itself; this
    // one reached the node).
    let refused = got
        .iter()
        .filter(|r| r.1 == "config.set" && r.3.starts_with("error"))
        .count();
    assert_eq!(refused, 1, "{got:#?}");
    // Filters.
    let secrets = list(&data, &["--action", "secrets."]);
    assert!(secrets.len() >= 3);
    assert!(
        secrets
            .iter()
            .all(|r| r["action"].as_str().unwrap().starts_with("secrets."))
    );
    assert!(list(&data, &["--principal", "nobody"]).is_empty());
    assert!(list(&data, &["--since", "2999-01-01T00:00:00Z"]).is_empty());
    let table = ok(&data, &["audit", "list"]);
    assert!(
        table.contains("config.unset") && table.contains("PRINCIPAL"),
        "{table}"
    );

    // A refused admin token is an authentication failure.
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/admin/v1/status", h.port))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let failures = flushed(&data, &["--action", "auth.failure"]);
    assert_eq!(failures[0]["principal"], "unauthenticated");
    assert_eq!(failures[0]["outcome"], "denied");

    // Tool calls: not recorded by default, recorded once turned on.
    let client = reqwest::Client::new();
    let call = json!({"name": "notes_put", "arguments": {"name": "a", "text": "b"}});
    let r = stateless(&client, &h.url(), 1, "tools/call", call.clone(), json!({})).await;
    assert!(r.status().is_success());
    ok(&data, &["config", "set", "audit.tool_calls", "on"]);
    assert!(flushed(&data, &["--action", "tools.call"]).is_empty());
    // The setting reaches the engine through the store's change feed, on its own time: calls
    // are made until one is recorded (bounded).
    let recorded =
        haven_testkit::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            let client = client.clone();
            let call = call.clone();
            let url = h.url();
            let data = data.clone();
            async move {
                stateless(&client, &url, 2, "tools/call", call, json!({})).await;
                !flushed(&data, &["--action", "tools.call"]).is_empty()
            }
        })
        .await;
    assert!(recorded, "no tools.call record");
    let calls = list(&data, &["--action", "tools.call"]);
    assert_eq!(calls[0]["principal"], "anonymous");
    assert_eq!(calls[0]["target"], "tool:notes_put");
    // The legacy era too.
    let legacy = common::Legacy::connect(&h.url()).await;
    let got = legacy.call_tool(3, "notes_get", json!({"name": "a"})).await;
    assert!(got.get("result").is_some(), "{got}");
    let calls = flushed(&data, &["--action", "tools.call"]);
    assert!(
        calls.iter().any(|c| c["target"] == "tool:notes_get"),
        "no tools.call record of the legacy call: {calls:?}"
    );
    // The node's status says how much it wrote and dropped.
    let status = h.status().await;
    assert_eq!(status["audit"]["dropped"], 0, "{status}");
    assert!(status["audit"]["written"].as_u64().unwrap() > 5, "{status}");

    // The secret's value appears nowhere in the export.
    let export = ok(&data, &["audit", "export"]);
    assert!(export.lines().count() > 10);
    assert!(export.contains("secret:gh_token"));
    assert!(
        !export.contains(SECRET),
        "the secret's value is in the audit export"
    );
    for line in export.lines() {
        serde_json::from_str::<Value>(line).unwrap();
    }

    // Verify passes; the node's public key is printed for pinning.
    ok(&data, &["audit", "checkpoint"]);
    let v: Value = serde_json::from_str(&ok(&data, &["audit", "verify", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    let pinned = v["published_keys"][0]["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let chain = v["chains"][0]["chain"].as_str().unwrap().to_owned();
    assert!(
        v["chains"][0]["checkpoints"].as_u64().unwrap() >= 1,
        "{v:#}"
    );
    let text = ok(&data, &["audit", "verify", "--trusted-key", &pinned]);
    assert!(text.contains("the audit log verifies"), "{text}");

    // Ship everything, stop the node, lose the data directory, restore.
    ok(&data, &["backup", "now"]);
    assert!(h.terminate(Duration::from_secs(30)).await);
    let secrets_keys = std::fs::read(data.join("secrets.keys")).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    let restored = dir.path().join("restored");
    let out = Command::new(common::haven_bin())
        .args([
            "backup",
            "restore",
            "--backup-url",
            bu,
            "--backup-key-file",
            bk,
            "--to",
        ])
        .arg(&restored)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_key_file(&restored.join("secrets.keys"), secrets_keys);
    let port = free_port();
    let h = Haven::start(&restored, port, "default", &[]).await;
    let (code, out, err) = haven(&restored, &["audit", "verify", "--trusted-key", &pinned]);
    assert_eq!(code, 0, "{out}{err}");
    let restored_list = actions(&list(&restored, &["--action", "config."]));
    assert!(restored_list.len() >= 3, "{restored_list:?}");
    drop(h);

    // A byte of a stored record changed in the redb file (node stopped) is named.
    {
        let store = RedbStore::open(
            &restored,
            Origin::new("tamper", "tamper"),
            std::sync::Arc::new(HybridClock::default()),
        )
        .unwrap();
        let key = haven_audit::record_key(&chain, 2);
        let mut value = store
            .get(haven_audit::AUDIT_NS, &key)
            .await
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        let at = value.windows(6).position(|w| w == b"admin-").unwrap();
        value[at] = b'A';
        store
            .commit(Batch::new().put(haven_audit::AUDIT_NS, &key, value))
            .await
            .unwrap();
    }
    let _h = Haven::start(&restored, port, "default", &[]).await;
    let (code, out, err) = haven(&restored, &["audit", "verify", "--trusted-key", &pinned]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("FIRST BAD RECORD: {chain}/2 (altered)")),
        "{out}"
    );
}

/// Three nodes of one region (NATS JetStream) change settings at the same time: each writes its
/// own chain without coordination, and every node verifies all three with their checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_of_a_cluster_write_their_own_chains_and_every_node_verifies_them() {
    let _one = common::cluster::ONE_REGION_AT_A_TIME.lock().await;
    let region = common::cluster::Region::start().await;
    let data: Vec<std::path::PathBuf> = (0..3)
        .map(|i| region.dirs.path().join(format!("node{i}")))
        .collect();
    // Concurrent changes, one node each.
    let children: Vec<_> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Command::new(common::haven_bin())
                .args(["config", "set", "limits.max_notes"])
                .arg(format!("{}", 1000 + i))
                .arg("--data")
                .arg(d)
                .env_remove("HAVEN_ADMIN_TOKEN")
                .env_remove("HAVEN_NODE")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for d in &data {
        ok(d, &["audit", "checkpoint"]);
    }
    for d in &data {
        let v: Value = serde_json::from_str(&ok(d, &["audit", "verify", "--json"])).unwrap();
        assert_eq!(v["ok"], true, "{v:#}");
        let chains: Vec<&str> = v["chains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["chain"].as_str().unwrap())
            .collect();
        assert_eq!(chains, ["r1/node0", "r1/node1", "r1/node2"], "{v:#}");
        for c in v["chains"].as_array().unwrap() {
            assert!(c["checkpoints"].as_u64().unwrap() >= 1, "{v:#}");
        }
        let sets = list(d, &["--action", "config.set"]);
        assert_eq!(sets.len(), 3, "{sets:#?}");
    }
}
