//! Cluster mode against real processes on loopback: three nats-server processes in one
//! JetStream cluster, three Haven nodes on it, HAProxy in front.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{ONE_REGION_AT_A_TIME, Region, haven_status};
use common::{Haven, Legacy, SseReader, free_port, run_ok, stateless};
use serde_json::{Value, json};

/// A notes_put through the proxy, retried on 503 (with Retry-After) up to `within`.
async fn put_note(
    client: &reqwest::Client,
    url: &str,
    id: i64,
    name: &str,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            stateless(
                client,
                url,
                id,
                "tools/call",
                json!({"name":"notes_put","arguments":{"name":name,"text":name}}),
                json!({}),
            ),
        )
        .await;
        if let Ok(r) = r {
            let status = r.status();
            if status == 200 {
                let v: Value = r.json().await.unwrap_or(Value::Null);
                if v.get("result").is_some() && v["result"]["isError"] != json!(true) {
                    return true;
                }
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every note name through the proxy (retried while the region answers with errors).
async fn all_notes(url: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(n) = try_all_notes(url).await {
            return n;
        }
        assert!(Instant::now() < deadline, "notes_list kept failing");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn try_all_notes(url: &str) -> Option<BTreeSet<String>> {
    let client = reqwest::Client::new();
    let mut names = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut id = 100_000;
    loop {
        id += 1;
        let mut args = json!({});
        if let Some(c) = &cursor {
            args["cursor"] = json!(c);
        }
        let r = stateless(
            &client,
            url,
            id,
            "tools/call",
            json!({"name":"notes_list","arguments":args}),
            json!({}),
        )
        .await;
        if r.status() != 200 {
            return None;
        }
        let v: Value = r.json().await.ok()?;
        v.get("result")?;
        let sc = &v["result"]["structuredContent"];
        for n in sc["notes"].as_array().cloned().unwrap_or_default() {
            if let Some(s) = n.as_str() {
                names.insert(s.to_owned());
            } else if let Some(s) = n["name"].as_str() {
                names.insert(s.to_owned());
            }
        }
        match sc["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    Some(names)
}

/// One client's long call: its session, the stream's last event id, indices seen, its node.
struct Held {
    client: Legacy,
    last_id: String,
    indices: Vec<u64>,
    node: String,
    sse: Option<SseReader>,
    resumed: bool,
}

/// Reads a held stream (and resumes it through the proxy when it breaks) until the final
/// response to request 50.
async fn finish(mut h: Held, deadline: Instant) -> (Held, Value) {
    loop {
        assert!(
            Instant::now() < deadline,
            "no result for a client after failover"
        );
        let mut sse = match h.sse.take() {
            Some(s) => s,
            None => {
                let r = h.client.resume(&h.last_id).await;
                if r.status() != 200 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                h.node = r.headers()["x-haven-node"].to_str().unwrap().to_owned();
                h.resumed = true;
                SseReader::new(r)
            }
        };
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(30), sse.next()).await {
            if e.data.is_empty() {
                continue;
            }
            h.last_id = e.id.clone().unwrap();
            h.indices.push(e.index().unwrap());
            let v = e.json();
            if v.get("id") == Some(&json!(50)) {
                return (h, v);
            }
        }
    }
}

// Long by design: one region, a node killed mid-stream, every stream resumed and checked event by
// event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_streams_resume_on_another_node_without_loss_or_duplicate() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    let url = region.proxy.url();
    let first = Legacy::connect(&url).await;

    // Any node serves the session: several requests, spread by the proxy.
    let mut served = BTreeSet::new();
    for i in 0..6 {
        let r = first
            .post_raw(json!({"jsonrpc":"2.0","id":i,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}))
            .await;
        served.insert(r.headers()["x-haven-node"].to_str().unwrap().to_owned());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["result"]["content"][0]["text"], "hi");
    }
    assert!(served.len() >= 2, "requests reached {served:?}");

    // Six clients hold SSE streams of a long idempotent call, spread over the nodes.
    let mut clients = vec![first.with_url(&url)];
    for _ in 1..6 {
        clients.push(Legacy::connect(&url).await);
    }
    let held: Vec<Held> = futures::future::join_all(clients.into_iter().map(|client| async move {
        let r = client
            .post_raw(json!({"jsonrpc":"2.0","id":50,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":6},"_meta":{"progressToken":"p"}}}))
            .await;
        let node = r.headers()["x-haven-node"].to_str().unwrap().to_owned();
        let mut sse = SseReader::new(r);
        let mut last_id = String::new();
        let mut indices = Vec::new();
        while indices.is_empty() {
            let e = tokio::time::timeout(Duration::from_secs(10), sse.next())
                .await
                .unwrap()
                .unwrap();
            if let Some(id) = &e.id {
                last_id = id.clone();
            }
            if !e.data.is_empty() {
                indices.push(e.index().unwrap());
            }
        }
        Held {
            client,
            last_id,
            indices,
            node,
            sse: Some(sse),
            resumed: false,
        }
    }))
    .await;
    let owner = held[0].node.clone();
    let on_killed = held.iter().filter(|h| h.node == owner).count();
    let killed = region.index_of_node(&owner);
    let killed_at = Instant::now();
    region.nodes[killed].as_mut().unwrap().kill9();
    region.nodes[killed] = None;

    // Every client gets its result, the ones on the dead node through another node; every
    // event exactly once and none missing.
    let deadline = Instant::now() + Duration::from_secs(90);
    let results = futures::future::join_all(held.into_iter().map(|h| {
        let was_on_killed = h.node == owner;
        async move {
            let (h, v) = finish(h, deadline).await;
            (was_on_killed, h, v)
        }
    }))
    .await;
    for (was_on_killed, h, v) in &results {
        assert!(v["result"]["content"].is_array(), "{v}");
        if *was_on_killed && h.resumed {
            assert_ne!(h.node, owner, "resumed on another node");
        }
        let mut sorted = h.indices.clone();
        sorted.dedup();
        assert_eq!(sorted, h.indices, "no event twice");
        assert!(
            h.indices.windows(2).all(|w| w[1] == w[0] + 1),
            "no event lost: {:?}",
            h.indices
        );
    }
    assert!(
        results.iter().any(|(k, h, _)| *k && h.resumed),
        "a stream of the killed node was resumed elsewhere"
    );
    eprintln!(
        "{on_killed} of 6 streams were on the killed node; all results {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );

    // The sessions go on, no re-initialization.
    let v = results[0]
        .1
        .client
        .call_tool(60, "echo", json!({"text":"still here"}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], "still here");
    let st = region.status().await;
    let dead: Vec<&Value> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == false)
        .collect();
    assert!(
        dead.iter().any(|n| n["info"]["node"] == owner.as_str()),
        "{st}"
    );
}

// Long by design: one region through a leader kill and its rejoin, writes checked at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_after_the_stream_leader_is_killed_and_it_rejoins() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    let url = region.proxy.url();
    let client = reqwest::Client::new();
    for i in 0..5 {
        assert!(
            put_note(
                &client,
                &url,
                i,
                &format!("before-{i}"),
                Duration::from_secs(10)
            )
            .await
        );
    }
    let st = region.status().await;
    let leader = st["store"]["leader"].as_str().unwrap().to_owned();
    // `haven status` shows the region, its nodes and the stream (the membership view
    // refreshes every second, so a node started last may take a moment to appear).
    let n0 = region.nodes[0].as_ref().unwrap();
    let wanted = [
        "Region r1",
        "node0",
        "node1",
        "node2",
        "STATE",
        "up",
        "NATS JetStream stream HAVEN_R1",
        "Writable: yes",
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = haven_status(n0);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !text.contains(w))
            .collect();
        if missing.is_empty() {
            // The stream's replicas each print a lag that is a number, never JSON's null.
            assert!(!text.contains("null"), "null in:\n{text}");
            assert!(
                text.lines()
                    .filter(|l| l.trim_start().starts_with("replica "))
                    .all(|l| l
                        .rsplit("lag ")
                        .next()
                        .is_some_and(|n| n.trim().parse::<u64>().is_ok())),
                "a replica's lag is not a number:\n{text}"
            );
            assert!(text.contains("  replica "), "no replica lines:\n{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing:?} missing from:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let li = region.nats.index_of(&leader).unwrap();
    let killed_at = Instant::now();
    region.nats.kill9(li);
    // Writes succeed again after the election (503s meanwhile are retried).
    let mut first_ok = None;
    for i in 0..20 {
        assert!(
            put_note(
                &client,
                &url,
                100 + i,
                &format!("after-{i}"),
                Duration::from_secs(30)
            )
            .await,
            "write {i} after the leader died"
        );
        first_ok.get_or_insert_with(|| killed_at.elapsed());
    }
    eprintln!("first write after the leader kill: {:?}", first_ok.unwrap());
    let st = region.status().await;
    assert_ne!(
        st["store"]["leader"].as_str(),
        Some(leader.as_str()),
        "{st}"
    );
    // The old leader comes back and catches up without operator action.
    region.nats.restart(li).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = region.status().await;
        let peers = st["store"]["peers"].as_array().cloned().unwrap_or_default();
        if peers
            .iter()
            .any(|p| p["name"] == leader.as_str() && p["current"] == true && p["offline"] == false)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{leader} did not rejoin: {st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let notes = all_notes(&url).await;
    for i in 0..5 {
        assert!(notes.contains(&format!("before-{i}")));
    }
    for i in 0..20 {
        assert!(notes.contains(&format!("after-{i}")));
    }
    drop(region.nodes.drain(..));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    let url = region.proxy.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let url = url.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let id = (w * 1_000_000 + i) as i64;
                let r = stateless(
                    &client,
                    &url,
                    id,
                    "tools/call",
                    json!({"name":"notes_put","arguments":{"name":format!("w{w}-{i}"),"text":"x"}}),
                    json!({}),
                )
                .await;
                let status = r.status();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                if status == 200 && v.get("result").is_some() {
                    ok += 1;
                } else {
                    failed.push(format!("{status} {v}"));
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let node = region.nodes[i].as_mut().unwrap();
        assert!(
            node.terminate(Duration::from_secs(40)).await,
            "node{i} drained and exited"
        );
        region.nodes[i] = None;
        region.restart_node(i).await;
        // Let the proxy see it healthy again before the next one goes.
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    assert!(total > 50, "{total} requests during the rolling restart");
    eprintln!("{total} requests during the rolling restart, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_rounds_of_random_kills_lose_no_acknowledged_write() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    let url = region.proxy.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..2 {
        let url = url.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let name = format!("w{w}-{i}");
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .header("mcp-protocol-version", "2026-07-28")
                    .header("mcp-method", "tools/call")
                    .header("mcp-name", "notes_put")
                    .body(json!({"jsonrpc":"2.0","id":i,"method":"tools/call","params":{"name":"notes_put","arguments":{"name":name,"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/clientInfo":{"name":"checker","version":"1"}}}}).to_string())
                    .send()
                    .await;
                let Ok(r) = r else { continue };
                if r.status() != 200 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let Ok(v) = r.json::<Value>().await else { continue };
                if v.get("result").is_some() && v["result"]["isError"] != json!(true) {
                    acked.push(name);
                }
            }
            acked
        }));
    }
    // One thing at a time dies (kill -9) and comes back: a Haven node or a NATS server.
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let started = Instant::now();
    for round in 0..50 {
        let which = (next() % 6) as usize;
        if which < 3 {
            region.nodes[which].as_mut().unwrap().kill9();
            region.nodes[which] = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
            region.restart_node(which).await;
        } else {
            let i = which - 3;
            region.nats.kill9(i);
            tokio::time::sleep(Duration::from_millis(200)).await;
            region.nats.restart(i).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "round {round}: the chaos loop is bounded"
        );
    }
    // Let the last restart settle, then stop writing and check.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.unwrap());
    }
    let notes = all_notes(&url).await;
    let lost: Vec<&String> = acked.iter().filter(|n| !notes.contains(*n)).collect();
    eprintln!(
        "{} writes acknowledged during 50 rounds of kills ({:.0} s), {} lost",
        acked.len(),
        started.elapsed().as_secs_f64(),
        lost.len()
    );
    assert!(
        acked.len() > 100,
        "the writers made progress: {}",
        acked.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}

async fn backup_status(node: &Haven) -> Value {
    admin_get(node, "backup").await
}

/// POST to the admin API's `/admin/v1/{what}` on `node`, as JSON (the status must be 200).
async fn admin_post(node: &Haven, what: &str) -> Value {
    let r = admin(node, reqwest::Method::POST, what).await;
    assert_eq!(r.status(), 200, "POST {what}");
    r.json().await.unwrap()
}

/// GET of the admin API's `/admin/v1/{what}` on `node`, as JSON.
async fn admin_get(node: &Haven, what: &str) -> Value {
    admin(node, reqwest::Method::GET, what)
        .await
        .json()
        .await
        .unwrap()
}

/// A request to the admin API's `/admin/v1/{what}` on `node`, with the node's admin token.
async fn admin(node: &Haven, method: reqwest::Method, what: &str) -> reqwest::Response {
    let token = std::fs::read_to_string(node.data.join("admin.token")).unwrap();
    reqwest::Client::new()
        .request(
            method,
            format!("http://127.0.0.1:{}/admin/v1/{what}", node.port),
        )
        .bearer_auth(token.trim())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
}

// Long by design: one region: shipping, the holder killed, takeover, then the backup restored and
// checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_per_region_ships_backups_and_another_takes_over_when_it_dies() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("backup.key");
    common::write_key_file(&key, format!("{}\n", "ab".repeat(32)));
    let backup = keys.path().join("backup");
    let (b, k) = (
        backup.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    );
    let mut region = Region::start_with(&[
        "--backup-url",
        &b,
        "--backup-key-file",
        &k,
        "--backup-interval",
        "1s",
    ])
    .await;
    let url = region.proxy.url();
    let client = reqwest::Client::new();
    for i in 0..10 {
        assert!(put_note(&client, &url, i, &format!("a-{i}"), Duration::from_secs(10)).await);
    }
    // Exactly one node ships; the others stand by.
    let deadline = Instant::now() + Duration::from_secs(20);
    let shipper = loop {
        let mut states = Vec::new();
        for n in region.nodes.iter().flatten() {
            states.push(
                backup_status(n).await["state"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            );
        }
        let ok: Vec<usize> = states
            .iter()
            .enumerate()
            .filter(|(_, s)| *s == "ok")
            .map(|(i, _)| i)
            .collect();
        if ok.len() == 1 && states.iter().filter(|s| *s == "standby").count() == 2 {
            break ok[0];
        }
        assert!(Instant::now() < deadline, "states: {states:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // The shipper dies; another node takes the lease and goes on in the same generation.
    region.nodes[shipper].as_mut().unwrap().kill9();
    region.nodes[shipper] = None;
    for i in 0..10 {
        assert!(
            put_note(
                &client,
                &url,
                100 + i,
                &format!("b-{i}"),
                Duration::from_secs(20)
            )
            .await
        );
    }
    // Another node takes the lease once the dead holder's has lapsed (real time, across
    // processes: polled, with a bound). Then it is told to ship now, which ships everything
    // committed so far: the log as far as it was once the notes were written.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (taker, target) = loop {
        let mut ok = Vec::new();
        let mut target = None;
        for (i, n) in region.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            let st = backup_status(n).await;
            target = target.or(st["local_seq"].as_u64().filter(|t| *t > 0));
            if st["state"] == "ok" {
                ok.push(i);
            }
        }
        if let ([i], Some(t)) = (ok.as_slice(), target) {
            break (*i, t);
        }
        assert!(
            Instant::now() < deadline,
            "no node took over shipping: {ok:?} shipping"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let report = admin_post(region.nodes[taker].as_ref().unwrap(), "backup/now").await;
    assert!(
        report["shipped_seq"].as_u64() >= Some(target),
        "shipping now did not reach {target}: {report}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["backup", "list", "--backup-url", &b, "--json"])
        .output()
        .unwrap();
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gens = list["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 1, "the region keeps one generation: {list}");
    let snaps = gens[0]["snapshots"].as_array().unwrap();
    let mut next = snaps[0]["last_seq"].as_u64().unwrap() + 1;
    for s in gens[0]["segments"].as_array().unwrap() {
        let first = s["first_seq"].as_u64().unwrap();
        assert!(first <= next, "no gap: {s}");
        next = next.max(s["last_seq"].as_u64().unwrap() + 1);
    }
    // The backup restores every acknowledged note.
    let to = keys.path().join("restored");
    run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
            .args([
                "backup",
                "restore",
                "--backup-url",
                &b,
                "--backup-key-file",
                &k,
                "--to",
            ])
            .arg(&to),
    );
    let restored = Haven::start(&to, free_port(), "default", &["--store", "embedded"]).await;
    let notes = all_notes(&restored.url()).await;
    for i in 0..10 {
        assert!(
            notes.contains(&format!("a-{i}")) && notes.contains(&format!("b-{i}")),
            "{notes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nats_cluster_makes_nodes_unready_and_answer_503_then_they_recover() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    let node_port = region.ports[0];
    let direct = format!("http://127.0.0.1:{node_port}/mcp");
    let client = reqwest::Client::new();
    assert!(put_note(&client, &direct, 1, "before", Duration::from_secs(10)).await);

    // One server down: still a quorum; the region takes writes.
    region.nats.kill9(2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = region.proxy.url();
    assert!(put_note(&client, &url, 2, "one-down", Duration::from_secs(30)).await);

    // All down: /readyz fails and a write gets 503 with Retry-After, quickly, never a hang.
    region.nats.kill9(0);
    region.nats.kill9(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::cluster::http_status(node_port, "/readyz").await != Some(503) {
        assert!(
            Instant::now() < deadline,
            "/readyz kept answering 200 without NATS"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let r = stateless(
        &client,
        &direct,
        3,
        "tools/call",
        json!({"name":"notes_put","arguments":{"name":"during","text":"x"}}),
        json!({}),
    )
    .await;
    let took = started.elapsed();
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").cloned();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert!(took < Duration::from_secs(15), "answered in {took:?}");
    // A write the store refused is an outage, not a failed request: 503, when to retry, and the
    // JSON-RPC error marked retryable (nothing was changed).
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        retry_after.as_ref().and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(body["id"], 3, "{body}");
    assert_eq!(
        body["error"]["data"],
        json!({"retryable": true, "reason": "store-unavailable"}),
        "{body}"
    );

    // The servers come back: the node is ready again and writes succeed, without operator
    // action.
    for i in 0..3 {
        region.nats.restart(i).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::cluster::http_status(node_port, "/readyz").await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the node did not become ready again"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(put_note(&client, &direct, 4, "after", Duration::from_secs(30)).await);
    let notes = all_notes(&direct).await;
    for n in ["before", "one-down", "after"] {
        assert!(notes.contains(n), "{notes:?}");
    }
    assert!(!notes.contains("during"));
}

async fn node_config(node: &Haven) -> Value {
    admin_get(node, "config").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_changed_on_one_node_applies_on_every_node_within_a_second() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let region = Region::start().await;
    let nodes: Vec<&Haven> = region.nodes.iter().flatten().collect();
    let token = std::fs::read_to_string(nodes[0].data.join("admin.token")).unwrap();
    let client = reqwest::Client::new();
    // Time from the set being acknowledged by node0 to the value being in force on the
    // others, over 20 changes.
    let mut lags = Vec::new();
    for i in 0..20u64 {
        let value = 10_000 + i;
        let r = client
            .put(format!(
                "http://127.0.0.1:{}/admin/v1/config/upstream.timeout_ms",
                nodes[0].port
            ))
            .bearer_auth(token.trim())
            .json(&json!({ "value": value.to_string() }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let acked = Instant::now();
        for n in &nodes[1..] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let v = node_config(n).await;
                if v["in_force"]["values"]["upstream.timeout_ms"] == json!(value) {
                    break;
                }
                assert!(Instant::now() < deadline, "not applied on {}: {v}", n.port);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        lags.push(acked.elapsed());
    }
    lags.sort();
    let median = lags[lags.len() / 2];
    println!(
        "config change applied on both other nodes after: median {median:?}, max {:?} (20 changes)",
        lags[lags.len() - 1]
    );
    // Every node reads the same settings from the store.
    let lists: Vec<Value> = futures::future::join_all(nodes.iter().map(|n| node_config(n))).await;
    for l in &lists[1..] {
        assert_eq!(l["settings"], lists[0]["settings"]);
    }

    // An authorization rule written on node0 is in force on every node (issue 13 §3):
    // authentication is off, so the caller is `anonymous`.
    let r = client
        .post(format!(
            "http://127.0.0.1:{}/admin/v1/auth/rules",
            nodes[0].port
        ))
        .bearer_auth(token.trim())
        .json(&json!({"name": "only-echo", "principals": ["anonymous"], "tools": ["echo"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for n in &nodes[1..] {
        let applied = haven_testkit::wait_until(
            Duration::from_secs(10),
            Duration::from_millis(5),
            || async { admin_get(n, "status").await["authorization"]["rules"] == json!(1) },
        )
        .await;
        assert!(applied, "the rule is not in force on {}", n.port);
        let l = Legacy::connect(&n.url()).await;
        let v = l.request(1, "tools/list", json!({})).await;
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["result"]["tools"][0]["name"], "echo", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_registered_on_one_node_is_served_by_every_node_and_survives_a_node_kill() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    common::upstreams::require_tools();
    let fast = common::upstreams::Upstream::fastmcp_http().await;
    let mut region = Region::start().await;
    let node0 = region.nodes[0].as_ref().unwrap();
    let (status, v) = common::upstreams::admin(
        node0,
        reqwest::Method::POST,
        "/admin/v1/registry",
        Some(json!({"name": "fast", "transport": "http", "url": fast.url()})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let client = reqwest::Client::new();
    let add = |url: String, id: i64| {
        let client = client.clone();
        async move {
            let r = stateless(
                &client,
                &url,
                id,
                "tools/call",
                json!({"name": "fast__add", "arguments": {"a": id, "b": 1}}),
                json!({}),
            )
            .await;
            let v: Value = r.json().await.unwrap_or(Value::Null);
            v["result"]["content"][0]["text"]
                .as_str()
                .map(str::to_owned)
        }
    };
    // Every node serves the upstream's tools (each with its own connection to it).
    for (i, port) in region.ports.clone().into_iter().enumerate() {
        let url = format!("http://127.0.0.1:{port}/mcp");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if add(url.clone(), 10 + i as i64).await == Some((11 + i as i64).to_string()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node{i} does not serve fast__add"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The node it was registered on dies; calls through the proxy keep working.
    region.nodes[0].take().unwrap().kill9();
    let url = region.proxy.url();
    let mut ok = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok < 20 {
        assert!(Instant::now() < deadline, "{ok} of 20 calls after the kill");
        if add(url.clone(), 100 + ok).await == Some((101 + ok).to_string()) {
            ok += 1;
        }
    }
    // And the registry, in the store, is still there for the restarted node.
    region.restart_node(0).await;
    let (_, v) = common::upstreams::admin(
        region.nodes[0].as_ref().unwrap(),
        reqwest::Method::GET,
        "/admin/v1/registry",
        None,
    )
    .await;
    assert_eq!(v["upstreams"][0]["name"], "fast", "{v}");
}

/// Writes version `v` of the note `big` (8 KiB) through `url`, retried like `put_note`.
async fn put_version(client: &reqwest::Client, url: &str, v: u32) {
    let text = format!("{v:04}").repeat(2048);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = stateless(
            client,
            url,
            i64::from(v),
            "tools/call",
            json!({"name":"notes_put","arguments":{"name":"big","text":text}}),
            json!({}),
        )
        .await;
        if r.status() == 200 {
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if v.get("result").is_some() && v["result"]["isError"] != json!(true) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "version {v} was not written");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The version of `big` that the MCP endpoint `url` serves.
async fn big_version(client: &reqwest::Client, url: &str) -> Option<u32> {
    let r = stateless(
        client,
        url,
        1,
        "tools/call",
        json!({"name":"notes_get","arguments":{"name":"big"}}),
        json!({}),
    )
    .await;
    let v: Value = r.json().await.ok()?;
    v["result"]["content"][0]["text"]
        .as_str()?
        .get(..4)?
        .parse()
        .ok()
}

// Long by design: one story: writes, trimming behind the backup, a node rebuilt from the
// trimmed stream, then a point-in-time restore from the backup.
/// Reclamation in a region: the node that ships the backups trims the stream's obsolete
/// messages once they are shipped (the others only forget in memory); a node restarted
/// from nothing rebuilds the same state from what is left, and the backup still restores
/// every point between two versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_trims_its_stream_behind_its_backup_and_the_backup_restores_every_point() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("backup.key");
    common::write_key_file(&key, format!("{}\n", "cd".repeat(32)));
    let backup = keys.path().join("backup");
    let (b, k) = (
        backup.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    );
    let mut region = Region::start_with(&[
        "--backup-url",
        &b,
        "--backup-key-file",
        &k,
        "--backup-interval",
        "1s",
    ])
    .await;
    let node0 = region.nodes[0].as_ref().unwrap();
    let token = std::fs::read_to_string(node0.data.join("admin.token")).unwrap();
    let client = reqwest::Client::new();
    let r = client
        .put(format!(
            "http://127.0.0.1:{}/admin/v1/config/storage.reclaim_interval_ms",
            node0.port
        ))
        .bearer_auth(token.trim())
        .json(&json!({"value": 300}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let url = region.proxy.url();
    let mut between = None;
    for v in 0..30u32 {
        put_version(&client, &url, v).await;
        if v == 10 {
            between = Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // One node trims, and removes at least the 29 superseded versions; the others do not.
    let deadline = Instant::now() + Duration::from_secs(60);
    let store = loop {
        let mut trimmers = Vec::new();
        let mut store = Value::Null;
        for n in region.nodes.iter().flatten() {
            let s = admin_get(n, "status").await;
            if s["reclamation"]["trims_log"] == json!(true) {
                trimmers.push(s["reclamation"]["removed"]["log_entries"].as_u64().unwrap());
                store = s["store"].clone();
            }
        }
        if trimmers.len() == 1 && trimmers[0] >= 29 {
            break store;
        }
        assert!(
            Instant::now() < deadline,
            "no single node trimmed the stream: {trimmers:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (messages, last) = (
        store["messages"].as_u64().unwrap(),
        store["last_seq"].as_u64().unwrap(),
    );
    assert!(
        messages + 29 <= last,
        "the stream holds {messages} of {last}"
    );
    // A node rebuilt from nothing (its index is in memory) reads the trimmed stream.
    region.kill9(2);
    region.restart_node(2).await;
    assert_eq!(big_version(&client, &region.node_url(2)).await, Some(29));
    assert_eq!(big_version(&client, &region.node_url(0)).await, Some(29));
    // The backup kept every version: a restore between versions 10 and 11 gives 10. Wait
    // until the shipping node (the one whose state is "ok") has shipped the log as far as it
    // was once the versions were written (the log goes on growing with the region's own
    // records, so a lag of exactly 0 may never be seen between two polls).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut target = None;
    loop {
        let mut shipped = None;
        for n in region.nodes.iter().flatten() {
            let st = backup_status(n).await;
            if st["state"] == "ok" {
                shipped = st["shipped_seq"].as_u64();
                target = target.or(st["local_seq"].as_u64());
            }
        }
        if let (Some(s), Some(t)) = (shipped, target)
            && s >= t
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backup never caught up: shipped {shipped:?} of {target:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let to = keys.path().join("restored");
    run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
            .args([
                "backup",
                "restore",
                "--backup-url",
                &b,
                "--backup-key-file",
                &k,
                "--at",
                &haven_backup::fmt_millis(between.unwrap()),
                "--to",
            ])
            .arg(&to),
    );
    let restored = Haven::start(&to, free_port(), "default", &["--store", "embedded"]).await;
    assert_eq!(big_version(&client, &restored.url()).await, Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_of_a_region_share_one_admin_token() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    let tokens: Vec<String> = region
        .nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(n.as_ref().unwrap().data.join("admin.token"))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    // The CLI with node0's data directory (its token) asks node1 and node2.
    let n0_data = region.nodes[0].as_ref().unwrap().data.clone();
    // `haven status` against the node on `port`, with node0's data directory (its token).
    let status_with_n0_token = |i: usize, port: u16| {
        let out = std::process::Command::new(common::haven_bin())
            .args([
                "status",
                "--node",
                &format!("http://127.0.0.1:{port}"),
                "--data",
            ])
            .arg(&n0_data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "node{i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for i in 1..3 {
        status_with_n0_token(i, region.nodes[i].as_ref().unwrap().port);
    }
    // A node restarted on a fresh data directory takes the region's token too.
    region.kill9(2);
    let fresh = region.dirs.path().join("node2");
    std::fs::remove_dir_all(&fresh).unwrap();
    region.restart_node(2).await;
    let t2 = std::fs::read_to_string(region.nodes[2].as_ref().unwrap().data.join("admin.token"))
        .unwrap();
    assert_eq!(t2.trim(), tokens[0]);
    status_with_n0_token(2, region.ports[2]);
    drop(region.nodes.drain(..));
}
