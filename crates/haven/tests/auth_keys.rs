//! Issue 13 §2, API keys, on the real binary: `haven auth keys create|list|revoke` against a
//! running node. The key is printed once; listings show no secret; a revoked key is listed as
//! revoked; bad input is refused and changes nothing; the secret appears in no log line, no
//! listing or export of the node and no file of its data directory.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Haven, free_port, haven_bin};
use serde_json::{Value, json};

/// `haven ARGS --data DATA` to its end.
fn haven(data: &Path, args: &[&str]) -> Output {
    Command::new(haven_bin())
        .args(args)
        .arg("--data")
        .arg(data)
        .env_remove("HAVEN_ADMIN_TOKEN")
        .env_remove("HAVEN_ADMIN_TOKEN_FILE")
        .env_remove("HAVEN_NODE")
        .env_remove("HAVEN_DATA")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = haven(data, args);
    assert!(
        out.status.success(),
        "haven {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `haven ARGS` must fail; its standard error.
fn refused(data: &Path, args: &[&str]) -> String {
    let out = haven(data, args);
    assert!(
        !out.status.success(),
        "haven {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn json_of(data: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&ok(data, args)).unwrap()
}

fn keys(data: &Path) -> Vec<Value> {
    json_of(data, &["auth", "keys", "list", "--json"])["keys"]
        .as_array()
        .unwrap()
        .clone()
}

/// The secret part of a presented key, `hvn_<id>_<secret>`.
fn secret_of(key: &str) -> &str {
    let rest = key.strip_prefix("hvn_").unwrap();
    rest.split_once('_').unwrap().1
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn create_list_revoke_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let h = Haven::start(&data, free_port(), "default", &["--log-level", "debug"]).await;
    let d = data.as_path();

    assert!(ok(d, &["auth", "keys", "list"]).contains("No API keys"));

    // Created: the key is printed once, alone on its line.
    let out = ok(
        d,
        &[
            "auth",
            "keys",
            "create",
            "--name",
            "ci deploy",
            "--scope",
            "mcp:tools",
            "--scope",
            "mcp:read",
            "--group",
            "deployers",
            "--expires",
            "30d",
        ],
    );
    let key1 = out
        .lines()
        .find(|l| l.starts_with("hvn_"))
        .unwrap_or_else(|| panic!("no key printed: {out}"))
        .to_owned();
    assert_eq!(key1.len(), 4 + 12 + 1 + 43, "{key1}");
    let id1 = key1[4..16].to_owned();
    assert!(
        out.contains(&id1) && out.contains("shown this once"),
        "{out}"
    );

    // With --json: the record and the key.
    let v = json_of(
        d,
        &[
            "auth",
            "keys",
            "create",
            "--name",
            "nightly",
            "--expires",
            "2099-01-01T00:00:00Z",
            "--json",
        ],
    );
    let key2 = v["api_key"].as_str().unwrap().to_owned();
    let id2 = v["id"].as_str().unwrap().to_owned();
    assert!(key2.starts_with(&format!("hvn_{id2}_")), "{v}");
    assert_eq!(v["state"], "active");
    assert_eq!(v["created_by"], "admin-token");
    assert_eq!(v["expires_at"], 4_070_908_800u64);
    assert!(v.get("secret_sha256").is_none(), "{v}");

    // Listed, without secrets.
    let table = ok(d, &["auth", "keys", "list"]);
    assert!(table.contains(&id1) && table.contains(&id2), "{table}");
    assert!(table.contains("ci deploy") && table.contains("mcp:read,mcp:tools"));
    let list = keys(d);
    assert_eq!(list.len(), 2);
    let k1 = list.iter().find(|k| k["id"] == id1.as_str()).unwrap();
    assert_eq!(k1["scopes"], json!(["mcp:read", "mcp:tools"]));
    assert_eq!(k1["groups"], json!(["deployers"]));
    assert_eq!(k1["state"], "active");
    for key in [&key1, &key2] {
        for shown in [&table, &serde_json::to_string(&list).unwrap()] {
            assert!(!shown.contains(secret_of(key)), "{shown}");
        }
    }
    assert!(!serde_json::to_string(&list).unwrap().contains("sha256"));

    // Bad input: a clear error, nothing changed.
    let before = keys(d);
    let e = refused(
        d,
        &["auth", "keys", "create", "--name", "x", "--scope", "a b"],
    );
    assert!(e.contains("scope"), "{e}");
    let e = refused(
        d,
        &[
            "auth",
            "keys",
            "create",
            "--name",
            "x",
            "--expires",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert!(e.contains("not in the future"), "{e}");
    let e = refused(
        d,
        &["auth", "keys", "create", "--name", "x", "--expires", "5x"],
    );
    assert!(e.contains("neither a duration"), "{e}");
    let e = refused(d, &["auth", "keys", "create", "--name", " "]);
    assert!(e.contains("name"), "{e}");
    let e = refused(d, &["auth", "keys", "revoke", "zzzzzzzzzzzz"]);
    assert!(e.contains("no API key with id 'zzzzzzzzzzzz'"), "{e}");
    let e = refused(d, &["auth", "keys", "revoke", "../status"]);
    assert!(e.contains("no API key"), "{e}");
    // The node refuses a bad scope itself too (not only the CLI), and unknown fields.
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/admin/v1/auth/keys", h.port);
    for body in [
        json!({"name": "x", "scopes": ["a\"b"]}),
        json!({"name": "x", "groups": [""]}),
        json!({"name": "x", "expires": -5}),
        json!({"name": "x", "expires": 1}),
        json!({"name": "x", "scope": ["mcp:tools"]}),
        json!({"scopes": ["mcp:tools"]}),
        json!(["x"]),
    ] {
        let r = client
            .post(&url)
            .bearer_auth(token.trim())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{v}");
    }
    // Without the admin token, nothing.
    let r = client
        .post(&url)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client.get(&url).bearer_auth(&key1).send().await.unwrap();
    assert_eq!(r.status(), 401, "an API key is no admin token");
    assert_eq!(keys(d), before);

    // Revoked: listed as revoked, by whom.
    let out = ok(d, &["auth", "keys", "revoke", &id1]);
    assert!(out.contains(&id1) && out.contains("Revoked"), "{out}");
    let list = keys(d);
    let k1 = list.iter().find(|k| k["id"] == id1.as_str()).unwrap();
    assert_eq!(k1["state"], "revoked");
    assert_eq!(k1["revoked_by"], "admin-token");
    assert!(k1["revoked_at"].is_u64());
    let k2 = list.iter().find(|k| k["id"] == id2.as_str()).unwrap();
    assert_eq!(k2["state"], "active");
    let table = ok(d, &["auth", "keys", "list"]);
    assert!(table.contains("revoked"), "{table}");
    // A second revocation is refused and changes nothing.
    let before = keys(d);
    let e = refused(d, &["auth", "keys", "revoke", &id1]);
    assert!(e.contains("already revoked"), "{e}");
    assert_eq!(keys(d), before);

    // The secrets appear nowhere the node shows or writes: its listings and exports, its log
    // (at debug level), the files of its data directory.
    let mut shown = vec![
        ok(d, &["registry", "list", "--json"]),
        ok(d, &["config", "list", "--json"]),
        ok(d, &["secrets", "list", "--all", "--json"]),
        ok(d, &["status", "--json"]),
        ok(d, &["auth", "keys", "list", "--json"]),
    ];
    let log_path = h.log.clone();
    drop(h);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("API key created"),
        "the log has no creation line: {log}"
    );
    shown.push(log);
    for key in [&key1, &key2] {
        let secret = secret_of(key);
        for s in &shown {
            assert!(!s.contains(secret), "a secret was shown: {s}");
        }
        for f in files_under(&data) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a secret",
                f.display()
            );
        }
    }
}
