//! Backups with the real binary: continuous shipping to S3 (a local moto server) and to a
//! directory, `kill -9` during shipping, restore after the data directory is destroyed,
//! tampering detected through the CLI, and an unreachable object store that never blocks
//! serving.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Haven, free_port, stateless};
use haven_state::{HybridClock, Origin, RedbStore, Store};
use serde_json::{Value, json};

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn tools_dir() -> PathBuf {
    std::env::var_os("HAVEN_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools"))
}

/// A moto S3 server on loopback, stopped when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    async fn start(port: u16, bucket: &str) -> Moto {
        let bin = tools_dir().join("venv/bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/install-tools (the README's test command does)",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let m = Moto { child, port };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client
                .put(format!("{}/{bucket}", m.endpoint()))
                .send()
                .await
            {
                assert!(
                    r.status().is_success(),
                    "creating the bucket: {}",
                    r.status()
                );
                return m;
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn aws_env(port: u16) -> Vec<(String, String)> {
    vec![
        (
            "AWS_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
    ]
}

/// Runs `haven backup ...`; returns (exit code, stdout, stderr).
/// `haven backup restore` of the backup at `url` (key file `key`) into `to`, with `extra`
/// arguments.
fn restore_cli(
    url: &str,
    key: &str,
    to: &Path,
    extra: &[&str],
    env: &[(String, String)],
) -> (i32, String, String) {
    let to = to.to_str().unwrap();
    let mut args = vec![
        "restore",
        "--backup-url",
        url,
        "--backup-key-file",
        key,
        "--to",
        to,
    ];
    args.extend(extra);
    cli(&args, env)
}

fn cli(args: &[&str], env: &[(String, String)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_haven"))
        .arg("backup")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("running haven backup");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn keygen(dir: &Path) -> PathBuf {
    let key = dir.join("backup.key");
    let (code, out, err) = cli(&["keygen", "--out", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    key
}

async fn put_note(client: &reqwest::Client, url: &str, id: i64, name: &str, text: &str) -> bool {
    // A bound against a hang, not a measure of speed: a loaded machine's debug build can take
    // seconds to write 512 KiB.
    let Ok(resp) = tokio::time::timeout(
        Duration::from_secs(60),
        stateless(
            client,
            url,
            id,
            "tools/call",
            json!({"name": "notes_put", "arguments": {"name": name, "text": text}}),
            json!({}),
        ),
    )
    .await
    else {
        return false;
    };
    let Ok(v) = resp.json::<Value>().await else {
        return false;
    };
    v.get("result").is_some() && v["result"]["isError"] != json!(true)
}

async fn admin(h: &Haven, method: reqwest::Method, path: &str) -> Value {
    let token = std::fs::read_to_string(h.data.join("admin.token")).unwrap();
    let r = reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:{}{path}", h.port))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

/// Notes (name -> stored value) in a data directory.
async fn notes_in(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let s = RedbStore::open(dir, Origin::new("t", "t"), Arc::new(HybridClock::default())).unwrap();
    let records = s.scan_all("notes", "").await.unwrap();
    records
        .into_iter()
        .map(|r| {
            let value = String::from_utf8_lossy(r.value()).into_owned();
            (r.record.key, value)
        })
        .collect()
}

/// The segments of every generation follow each other without gap or overlap.
fn assert_continuous(list: &Value) {
    for g in list["generations"].as_array().unwrap() {
        let snaps = g["snapshots"].as_array().unwrap();
        assert!(!snaps.is_empty(), "generation without snapshot: {g}");
        let mut next = snaps[0]["last_seq"].as_u64().unwrap() + 1;
        for s in g["segments"].as_array().unwrap() {
            let first = s["first_seq"].as_u64().unwrap();
            assert_eq!(first, next, "segments must follow each other exactly: {s}");
            next = s["last_seq"].as_u64().unwrap() + 1;
        }
        assert!(g["gaps"].as_array().unwrap().is_empty(), "{g}");
    }
}

// Long by design: one S3 story (outage, catch-up, restore, tampering), each step on the state the
// last left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backup_survives_an_unreachable_store_restores_and_detects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let s3_port = free_port();
    let env = aws_env(s3_port);
    let url = "s3://haven-backups/node-a";
    let data = dir.path().join("data");

    // The object store is down when the node starts: serving goes on, the lag shows.
    let mut h = Haven::start_env(
        &data,
        free_port(),
        "default",
        &[
            "--backup-url",
            url,
            "--backup-key-file",
            key.to_str().unwrap(),
            "--backup-interval",
            "1s",
            "--backup-archive-after",
            "0s",
        ],
        &env,
    )
    .await;
    let client = reqwest::Client::new();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..5 {
        let name = format!("offline-{i}");
        assert!(
            put_note(&client, &h.url(), i, &name, &format!("text {i}")).await,
            "serving is not blocked"
        );
        expected.insert(name, format!("text {i}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = admin(&h, reqwest::Method::GET, "/admin/v1/backup").await;
        if st["state"] == "failing" {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the unreachable store is not reported: {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(st["lag_entries"].as_u64().unwrap() >= 5, "{st}");
    assert!(
        st["last_error"].as_str().unwrap().contains("object store"),
        "{st}"
    );
    // Each failed round counts, in the status and in /metrics (where every kind starts at 0,
    // so that the first failure is an increase).
    assert!(st["failures"]["segment"].as_u64().unwrap() >= 1, "{st}");
    let token = std::fs::read_to_string(h.data.join("admin.token")).unwrap();
    let metrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/metrics", h.port))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures = |kind: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("haven_backup_failures_total{")
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert!(failures("segment").is_some_and(|n| n >= 1.0), "{metrics}");
    assert_eq!(failures("verification"), Some(0.0), "{metrics}");

    // The store comes up: shipping catches up by itself.
    let moto = Moto::start(s3_port, "haven-backups").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = admin(&h, reqwest::Method::GET, "/admin/v1/backup").await;
        if st["state"] == "ok" && st["lag_entries"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "shipping did not catch up: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (time, the notes at that time), recorded between batches of writes.
    let mut points = Vec::new();
    for i in 5..20 {
        let name = format!("online-{i}");
        assert!(put_note(&client, &h.url(), i, &name, &format!("text {i}")).await);
        expected.insert(name, format!("text {i}"));
        if i % 5 == 4 {
            // `haven backup now` (the CLI asks the node's admin API).
            let (code, out, err) = cli(
                &[
                    "now",
                    "--node",
                    &format!("http://127.0.0.1:{}", h.port),
                    "--data",
                    data.to_str().unwrap(),
                ],
                &[],
            );
            assert_eq!(code, 0, "{out}{err}");
            assert!(out.contains("shipped"), "{out}");
            points.push((now_millis(), expected.clone()));
            // Later writes carry a later commit time.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Everything written before `backup now` is shipped by it. (The request itself is a
    // control-plane change: its audit record is written after it, so the lag need not be 0.)
    let before = admin(&h, reqwest::Method::GET, "/admin/v1/backup").await["local_seq"]
        .as_u64()
        .unwrap();
    let r = admin(&h, reqwest::Method::POST, "/admin/v1/backup/now").await;
    assert!(
        r["shipped_seq"].as_u64().unwrap() >= before,
        "{r} (before: {before})"
    );
    let st = admin(&h, reqwest::Method::GET, "/admin/v1/backup").await;
    assert!(
        st["last_verification"]["at_millis"].as_u64().is_some(),
        "a verification ran on its own: {st}"
    );
    h.kill9();

    // list shows the chain; retention moved kept objects to the archive class on S3.
    let (code, out, err) = cli(&["list", "--backup-url", url, "--json"], &env);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_continuous(&list);
    let gen0 = &list["generations"][0];
    let archived: Vec<&Value> = gen0["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .chain(gen0["segments"].as_array().unwrap())
        .filter(|e| e["storage_class"] == "GLACIER_IR")
        .collect();
    assert!(!archived.is_empty(), "{list}");
    let obj = archived[0]["object"].as_str().unwrap();
    // The bucket listing (S3 ListObjectsV2) reports the object's storage class.
    let listing = client
        .get(format!(
            "{}/haven-backups?list-type=2&prefix=node-a/{obj}",
            moto.endpoint()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains("<StorageClass>GLACIER_IR</StorageClass>"),
        "{listing}"
    );
    let (code, out, _) = cli(&["list", "--backup-url", url], &env);
    assert_eq!(code, 0);
    assert!(
        out.contains("restorable:") && out.contains("Last verification"),
        "{out}"
    );

    // Restore into a new directory: exactly the acknowledged notes.
    let restored = dir.path().join("restored");
    let k = key.to_str().unwrap();
    let (code, out, err) = restore_cli(url, k, &restored, &[], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("restored"), "{out}");
    let notes = notes_in(&restored).await;
    assert_eq!(
        notes.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, text) in &expected {
        assert!(
            notes[name].contains(text.as_str()),
            "{name}: {}",
            notes[name]
        );
    }
    // Restore at each recorded time: exactly the notes written by then.
    for (i, (at, notes_then)) in points.iter().enumerate() {
        let to = dir.path().join(format!("at-{i}"));
        let at = haven_backup::fmt_millis(*at);
        let (code, out, err) = restore_cli(url, k, &to, &["--at", &at], &env);
        assert_eq!(code, 0, "{out}{err}");
        let notes = notes_in(&to).await;
        assert_eq!(
            notes.keys().collect::<Vec<_>>(),
            notes_then.keys().collect::<Vec<_>>(),
            "restore --at {at}"
        );
    }
    // Again into the same directory: refused unless told to overwrite.
    let (code, _, err) = restore_cli(url, k, &restored, &[], &env);
    assert_ne!(code, 0);
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );

    // A wrong key is refused by name.
    let other = dir.path().join("other.key");
    cli(&["keygen", "--out", other.to_str().unwrap()], &[]);
    let (code, _, err) = cli(
        &[
            "verify",
            "--backup-url",
            url,
            "--backup-key-file",
            other.to_str().unwrap(),
        ],
        &env,
    );
    assert_ne!(code, 0);
    assert!(err.contains("wrong backup key"), "{err}");

    // Tampering through the S3 API: each damaged object is named.
    let (code, out, err) = cli(
        &["verify", "--backup-url", url, "--backup-key-file", k],
        &env,
    );
    assert_eq!(code, 0, "{out}{err}");
    let segs: Vec<String> = gen0["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["object"].as_str().unwrap().to_owned())
        .collect();
    assert!(segs.len() >= 3, "{gen0}");
    // A signed S3 client, as an attacker or a faulty tool with write access would use.
    use object_store::{ObjectStoreExt, path::Path as ObjectPath};
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_bucket_name("haven-backups")
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap();
    let path = |o: &str| ObjectPath::from(format!("node-a/{o}"));
    let read = async |o: &str| {
        s3.get(&path(o))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    };
    let bytes = read(&segs[0]).await;
    let mut altered = bytes.clone();
    let n = altered.len();
    altered[n - 5] ^= 1;
    s3.put(&path(&segs[0]), altered.into()).await.unwrap();
    s3.delete(&path(&segs[1])).await.unwrap();
    let bytes = read(&segs[2]).await;
    s3.put(&path(&segs[2]), bytes[..bytes.len() / 2].to_vec().into())
        .await
        .unwrap();
    let (code, out, _) = cli(
        &["verify", "--backup-url", url, "--backup-key-file", k],
        &env,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("altered: {}", segs[0])), "{out}");
    assert!(out.contains(&format!("missing: {}", segs[1])), "{out}");
    assert!(out.contains(&format!("truncated: {}", segs[2])), "{out}");
    drop(moto);
}

// Long by design: one node killed while shipping, then the loss measured after a restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_shipping_then_data_loss_is_at_most_one_interval() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let backup = dir.path().join("backup");
    let url = backup.to_str().unwrap().to_owned();
    let data = dir.path().join("data");
    let k = key.to_str().unwrap().to_owned();
    let args = [
        "--backup-url",
        url.as_str(),
        "--backup-key-file",
        k.as_str(),
        "--backup-interval",
        "1s",
    ];
    let client = reqwest::Client::new();
    // name -> acknowledgement time
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut id = 0;
    let mut kill_at = 0;
    for cycle in 0..3u64 {
        let mut h = Haven::start(&data, free_port(), "default", &args).await;
        // Write for a while, then kill -9 in the middle of the writes (and of shipping).
        let run_for = Duration::from_millis(2300 + 350 * cycle);
        let started = Instant::now();
        while started.elapsed() < run_for {
            id += 1;
            let name = format!("c{cycle}-{id}");
            if put_note(&client, &h.url(), id, &name, "x").await {
                acked.push((name, now_millis()));
            }
        }
        kill_at = now_millis();
        h.kill9();
    }
    // The backup is one generation whose segments follow each other exactly.
    let (code, out, err) = cli(&["list", "--backup-url", &url, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list["generations"].as_array().unwrap().len(),
        1,
        "restarts resume the same generation"
    );
    assert_continuous(&list);
    let (code, out, _) = cli(
        &["verify", "--backup-url", &url, "--backup-key-file", &k],
        &[],
    );
    assert_eq!(code, 0, "{out}");

    // Disaster: the data directory is gone. Restore the latest point.
    std::fs::remove_dir_all(&data).unwrap();
    let restored = dir.path().join("restored");
    let (code, out, err) = restore_cli(&url, &k, &restored, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let notes = notes_in(&restored).await;
    let lost: Vec<&(String, u64)> = acked
        .iter()
        .filter(|(n, _)| !notes.contains_key(n))
        .collect();
    let window = lost
        .iter()
        .map(|(_, at)| kill_at.saturating_sub(*at))
        .max()
        .unwrap_or(0);
    eprintln!(
        "acknowledged {} notes, restored {}, lost {} acknowledged in the last {window} ms before the kill",
        acked.len(),
        notes.len(),
        lost.len()
    );
    // Everything acknowledged before the last kill's final shipping interval is there.
    assert!(
        window <= 1000 + 250,
        "lost writes acknowledged {window} ms before the kill"
    );
    // Nothing restored that was not written (notes from earlier cycles are all there).
    for n in notes.keys() {
        assert!(
            acked.iter().any(|(a, _)| a == n) || n.starts_with('c'),
            "{n}"
        );
    }
    let earlier: Vec<_> = acked
        .iter()
        .filter(|(n, _)| !n.starts_with("c2-"))
        .collect();
    assert!(
        earlier.iter().all(|(n, _)| notes.contains_key(n)),
        "writes before a restart are never lost"
    );
}

/// The events of a stream after `last`, read whole (until the stream ends; each within 60 s).
async fn read_resumed(client: &common::Legacy, last: &str) -> Vec<common::Event> {
    let r = client.resume(last).await;
    assert_eq!(r.status(), 200, "resuming after {last}");
    let mut sse = common::SseReader::new(r);
    let mut events = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(60), sse.next())
        .await
        .expect("a resumed stream ends or sends within 60 s")
    {
        if !e.data.is_empty() {
            events.push(e);
        }
    }
    events
}

/// A client that saw events of a stream beyond a point the node is then restored to: the
/// restored node settles the interrupted request at an index the client already saw, with
/// another event. The event id names the write, so the client's resumption is told apart:
/// it gets the restored history's final answer, exactly once (an index alone would say it
/// had it, and it would wait forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_from_before_a_point_in_time_restore_gets_the_restored_answer() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let url = dir.path().join("backup").to_str().unwrap().to_owned();
    let k = key.to_str().unwrap().to_owned();
    let args = ["--backup-url", &url, "--backup-key-file", &k];
    let mut h = Haven::start(&dir.path().join("data"), free_port(), "default", &args).await;
    let client = common::Legacy::connect(&h.url()).await;
    let r = client
        .post_raw(
            json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{
            "name":"sleep","arguments":{"seconds":4},"_meta":{"progressToken":"pitr"}}}),
        )
        .await;
    let mut sse = common::SseReader::new(r);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = sse.next().await.expect("the call's stream goes on");
        if !e.data.is_empty() {
            assert_eq!(e.json()["method"], "notifications/progress", "{e:?}");
            seen.push(e.id.expect("events have ids"));
        }
    }
    drop(sse);
    let first = haven_mcp::stream::parse_event_id(&seen[0]).unwrap();
    let second = haven_mcp::stream::parse_event_id(&seen[1]).unwrap();
    assert_eq!((first.index, second.index), (1, 2), "{seen:?}");
    // The point: when the first progress event was written (the second came a second later).
    let point = first
        .hlc
        .expect("a stored event's id names its write")
        .millis();
    assert!(second.hlc.unwrap().millis() > point, "{seen:?}");
    let r = admin(&h, reqwest::Method::POST, "/admin/v1/backup/now").await;
    assert!(r["shipped_seq"].as_u64().is_some(), "{r}");
    h.kill9();

    let restored = dir.path().join("restored");
    let at = haven_backup::fmt_millis(point);
    let (code, out, err) = restore_cli(&url, &k, &restored, &["--at", &at], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // The node is restored in place (its identity kept): a call it was running is settled
    // with an "interrupted" error, at once, at the next index.
    std::fs::copy(dir.path().join("data/node-id"), restored.join("node-id")).unwrap();
    let mut h = Haven::start(&restored, free_port(), "default", &[]).await;
    let client = client.with_url(&h.url());
    let read_after = |last: String| {
        let client = &client;
        async move { read_resumed(client, &last).await }
    };

    // The client that saw event 2 of the history the restore rolled back: the restored
    // node settled the request at index 2 (an interrupted call's error), which that client
    // has not seen.
    let after_second = read_after(seen[1].clone()).await;
    assert_eq!(after_second.len(), 1, "{after_second:?}");
    let answer = &after_second[0];
    assert_eq!(answer.index(), Some(2), "{answer:?}");
    assert_ne!(
        answer.id.as_ref(),
        Some(&seen[1]),
        "another event than the one seen"
    );
    let v = answer.json();
    assert_eq!(v["id"], 7, "{v}");
    assert_eq!(v["error"]["data"]["interrupted"], true, "{v}");
    // The client that saw only event 1 (which the restore kept) gets the same answer.
    let after_first = read_after(seen[0].clone()).await;
    assert_eq!(
        after_first.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![answer.id.clone()]
    );
    // And the answer's own id: nothing more.
    assert!(read_after(answer.id.clone().unwrap()).await.is_empty());
    h.kill9();

    // The same point restored under another identity (a new machine): the process that ran
    // the call is gone (an embedded store is open in one process alone), so the node runs
    // the idempotent call again at once, into the same stream after the point.
    let moved = dir.path().join("moved");
    let (code, out, err) = restore_cli(&url, &k, &moved, &["--at", &at], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let h = Haven::start(&moved, free_port(), "default", &[]).await;
    let client = client.with_url(&h.url());
    let events = read_resumed(&client, &seen[1]).await;
    let indexes: Vec<_> = events.iter().map(|e| e.index().unwrap()).collect();
    let want: Vec<u64> = (2..2 + events.len() as u64).collect();
    assert_eq!(
        indexes, want,
        "from the first event after the point, in order: {events:?}"
    );
    let answers: Vec<Value> = events
        .iter()
        .map(|e| e.json())
        .filter(|v| v.get("id").is_some())
        .collect();
    assert_eq!(answers.len(), 1, "{events:?}");
    assert_eq!(answers[0]["id"], 7);
    assert!(answers[0]["result"].is_object(), "{}", answers[0]);
    assert!(
        events.last().unwrap().json().get("id").is_some(),
        "{events:?}"
    );
}

/// A note overwritten again and again: once the backup has shipped the versions, the node
/// reclaims them (its store file stops growing with the history), and a point-in-time
/// restore between two versions still gives exactly the earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_values_are_reclaimed_and_restore_in_the_window_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let url = dir.path().join("backup").to_str().unwrap().to_owned();
    let k = key.to_str().unwrap().to_owned();
    let data = dir.path().join("data");
    let args = [
        "--backup-url",
        url.as_str(),
        "--backup-key-file",
        k.as_str(),
        "--backup-interval",
        "1s",
    ];
    let h = Haven::start(&data, free_port(), "default", &args).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let client = reqwest::Client::new();
    let r = client
        .put(format!(
            "http://127.0.0.1:{}/admin/v1/config/storage.reclaim_interval_ms",
            h.port
        ))
        .bearer_auth(token.trim())
        .json(&json!({"value": 200}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    // Versions of one note, each 512 KiB; the time between two of them is remembered.
    let text = |v: usize| format!("{v:04}").repeat(128 * 1024);
    let mut id = 0;
    let mut between = None;
    let mut write = |from: usize, to: usize| {
        let (client, url) = (client.clone(), h.url());
        let mut versions = Vec::new();
        for v in from..to {
            id += 1;
            versions.push((id, v));
        }
        async move {
            let mut at = None;
            for (id, v) in versions {
                assert!(
                    put_note(&client, &url, id, "big", &text(v)).await,
                    "version {v}"
                );
                if v == 5 {
                    at = Some(now_millis());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            at
        }
    };
    between = between.or(write(0, 20).await);
    // Reclaimed once shipped: wait until the node removed the superseded versions.
    let reclaimed = |at_least: u64| {
        let h = &h;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let s = admin(h, reqwest::Method::GET, "/admin/v1/status").await;
                let removed = s["reclamation"]["removed"]["log_entries"].as_u64().unwrap();
                if removed >= at_least {
                    return s;
                }
                assert!(Instant::now() < deadline, "not reclaimed: {s}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let file = data.join("state.redb");
    let size = || std::fs::metadata(&file).unwrap().len();
    // Rounds of 20 versions, each reclaimed (and the removal made durable, so that its pages
    // are free) before the next: the file reaches the size one round needs, then stays.
    let mut sizes = Vec::new();
    for round in 0..5usize {
        if round > 0 {
            write(20 * round, 20 * round + 20).await;
        }
        let s = reclaimed(20 * round as u64 + 19).await;
        let passes = s["reclamation"]["passes"].as_u64().unwrap();
        while admin(&h, reqwest::Method::GET, "/admin/v1/status").await["reclamation"]["passes"]
            .as_u64()
            .unwrap()
            < passes + 2
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        sizes.push(size() / 1024);
    }
    // 100 versions of 512 KiB are 50 MiB of history (twice over, with the log): rounds 2 to
    // 4 wrote 60 MiB that would stay without reclamation. With it the file may still take
    // a step (redb grows in regions of up to about 22 MiB here, and a busy machine reclaims
    // a round later) but not the history's size: less than half of it.
    eprintln!("store file after each round of 20 versions, KiB: {sizes:?}");
    assert!(
        sizes[4] <= sizes[1] + 30 * 1024,
        "the store file grew with the history: {sizes:?} KiB"
    );

    // The backup still holds every version: a restore between version 5 and 6 gives 5.
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin(&h, reqwest::Method::GET, "/admin/v1/status").await["backup"]["lag_entries"]
        .as_u64()
        != Some(0)
    {
        assert!(Instant::now() < deadline, "the backup never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = haven_backup::fmt_millis(between.unwrap());
    let to = dir.path().join("at");
    let (code, out, err) = restore_cli(&url, &k, &to, &["--at", &at], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(version_in(&to).await, Some(5));
    let to = dir.path().join("latest");
    let (code, out, err) = restore_cli(&url, &k, &to, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(version_in(&to).await, Some(99));
}

/// Which version of the note "big" a data directory holds (`None`: not that text).
async fn version_in(dir: &Path) -> Option<usize> {
    let stored: Value = serde_json::from_str(&notes_in(dir).await["big"]).ok()?;
    let text = stored["text"].as_str()?;
    let v: usize = text.get(..4)?.parse().ok()?;
    (text == format!("{v:04}").repeat(128 * 1024)).then_some(v)
}

/// Runs `haven ARGS...` with `stdin` as its standard input; (exit code, stdout, stderr).
fn haven(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running haven");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `backup now --snapshot` through the CLI: every call takes a snapshot of the state as it
/// is then (the admin call's own audit record is a change since the last one), and says so.
/// When nothing at all was committed since the newest snapshot, the shipper says why it
/// takes none (haven-backup's `forced_snapshot_with_nothing_new_says_why`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_now_snapshot_takes_a_snapshot_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let url = dir.path().join("backup").to_str().unwrap().to_owned();
    let k = key.to_str().unwrap().to_owned();
    let data = dir.path().join("data");
    let args = [
        "--backup-url",
        url.as_str(),
        "--backup-key-file",
        k.as_str(),
        "--backup-interval",
        "1h",
    ];
    let h = Haven::start(&data, free_port(), "default", &args).await;
    let d = data.to_str().unwrap().to_owned();
    let client = reqwest::Client::new();
    assert!(put_note(&client, &h.url(), 1, "a", "one").await);
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let (code, out, err) = cli(&["now", "--snapshot", "--data", &d, "--json"], &[]);
        assert_eq!(code, 0, "{out}{err}");
        let r: Value = serde_json::from_str(&out).unwrap();
        assert!(
            r["snapshot"] == true || r["snapshot_skipped"].is_string(),
            "neither a snapshot nor why not: {r}"
        );
        assert_eq!(r["snapshot_seq"], r["shipped_seq"], "{r}");
        seqs.push(r["snapshot_seq"].as_u64().unwrap());
        let (code, out, err) = cli(&["now", "--snapshot", "--data", &d], &[]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("and a snapshot")
                || out.contains(
                    "no new snapshot: nothing was committed since the snapshot of sequence"
                ),
            "{out}"
        );
    }
    let (code, out, err) = cli(&["list", "--backup-url", &url, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let snaps: Vec<u64> = list["generations"][0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["last_seq"].as_u64().unwrap())
        .collect();
    for s in &seqs {
        assert!(
            snaps.contains(s),
            "snapshot {s} is not in the backup: {snaps:?}"
        );
    }
    drop(h);
}

/// After a restore, `haven backup restore` says what the directory needs before it serves
/// (the secrets key file, an admin token, that its upstreams start, a new node id), warns
/// when `--at` is later than the newest backed-up change, and the restored directory then
/// serves with its upstreams held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_prints_what_the_directory_needs_and_warns_of_lag() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let url = dir.path().join("backup").to_str().unwrap().to_owned();
    let k = key.to_str().unwrap().to_owned();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap().to_owned();
    let args = [
        "--backup-url",
        url.as_str(),
        "--backup-key-file",
        k.as_str(),
        "--backup-interval",
        "1h",
    ];
    let h = Haven::start(&data, free_port(), "default", &args).await;
    let (code, out, err) = haven(&["secrets", "set", "api/token", "--data", &d], b"s3cret");
    assert_eq!(code, 0, "{out}{err}");
    // An upstream nobody listens for: it stays in backoff on the original node.
    let dead = format!("http://127.0.0.1:{}/mcp", free_port());
    let (code, out, err) = haven(
        &["registry", "add", "web", "--url", &dead, "--data", &d],
        b"",
    );
    assert_eq!(code, 0, "{out}{err}");
    let client = reqwest::Client::new();
    assert!(put_note(&client, &h.url(), 1, "a", "one").await);
    let (code, out, err) = cli(&["now", "--data", &d], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let old_node = std::fs::read_to_string(data.join("node-id")).unwrap();
    drop(h);

    // A time an hour after the newest backed-up change: the latest point, with a warning.
    let later = haven_backup::fmt_millis(now_millis() + 3_600_000);
    let restored = dir.path().join("restored");
    let (code, out, err) = restore_cli(&url, &k, &restored, &["--at", &later], &[]);
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("{out}");
    assert_eq!(notes_in(&restored).await.len(), 1);
    assert!(
        out.contains(&format!(
            "warning: {later} is after the newest change the backup holds"
        )) && out.contains("may lag behind that time")
            && (out.contains(" h 0 min before it") || out.contains("59 min")),
        "{out}"
    );
    // The checklist: what applies to this state.
    for expected in [
        // Counted as `haven secrets list` counts (api/token), Haven's own named.
        "holds 1 secret and 1 of Haven's own (a request-state signing key) wrapped by key-encryption key(s)",
        "as it is after its latest rotation",
        "secrets.keys",
        "admin token:",
        "--admin-token-file",
        "upstreams: 1 registered upstream(s) (web) start when it serves",
        "--hold-upstreams",
        "node id: the restored node gets a new node id",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    // Without --at: no lag warning.
    let (code, out, err) = restore_cli(&url, &k, &restored, &["--overwrite"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("warning:"), "{out}");
    let (code, out, err) = restore_cli(&url, &k, &dir.path().join("j"), &["--json"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["next_steps"].as_array().unwrap().len() >= 4, "{v}");

    // The checklist followed: the key file copied, upstreams held, a new admin token.
    std::fs::copy(data.join("secrets.keys"), restored.join("secrets.keys")).unwrap();
    let h = Haven::start(&restored, free_port(), "default", &["--hold-upstreams"]).await;
    let r = restored.to_str().unwrap();
    let (code, out, err) = haven(&["registry", "list", "--data", r, "--json"], b"");
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["upstreams"][0]["name"], "web", "{v}");
    assert_eq!(v["upstreams"][0]["status"]["state"], "held", "{v}");
    let (code, out, err) = haven(&["registry", "list", "--data", r], b"");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("held"), "{out}");
    let new_node = std::fs::read_to_string(restored.join("node-id")).unwrap();
    assert_ne!(old_node.trim(), new_node.trim());
    let (code, out, err) = haven(&["secrets", "list", "--data", r, "--json"], b"");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("api/token"), "{out}");
    drop(h);
}
