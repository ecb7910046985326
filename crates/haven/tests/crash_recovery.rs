//! Crash safety of the real binary: a client keeps its session, its stream and its tasks
//! through `kill -9` and a restart on the same data directory.

mod common;

use std::time::Duration;

use common::{Home, Legacy, SseReader, stateless, try_stateless};
use serde_json::{Value, json};

// Long by design: one process killed mid-stream and mid-task, then everything it held checked after
// the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_stream_and_tasks_survive_kill_9() {
    let home = Home::new();
    let mut haven = home.start("default", &[]).await;
    let client = Legacy::connect(&haven.url()).await;

    // A task of each form, created before the crash.
    let created = client
        .request(
            1,
            "tools/call",
            json!({"name":"sleep","arguments":{"seconds":3},"task":{"ttl":600000}}),
        )
        .await;
    let legacy_task = created["result"]["task"]["taskId"]
        .as_str()
        .expect("experimental task id")
        .to_owned();
    let http = reqwest::Client::new();
    let tasks_caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
    let r = stateless(
        &http,
        &haven.url(),
        2,
        "tools/call",
        json!({"name":"sleep","arguments":{"seconds":3}}),
        tasks_caps.clone(),
    )
    .await;
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["result"]["resultType"], "task", "{created}");
    let ext_task = created["result"]["taskId"].as_str().unwrap().to_owned();

    // A long call with progress on an SSE stream.
    let r = client
        .post_raw(json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":30},"_meta":{"progressToken":"crash"}}}))
        .await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut sse = SseReader::new(r);
    let priming = sse.next().await.unwrap();
    assert!(priming.data.is_empty());
    assert_eq!(priming.index().unwrap(), 0);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = sse.next().await.unwrap();
        assert_eq!(e.json()["method"], "notifications/progress");
        seen.push(e);
    }
    let last_seen = seen.last().unwrap().clone();

    // kill -9 while the call runs; restart on the same data directory.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    haven.kill9();
    drop(sse);
    let haven = home.start("default", &[]).await;

    // Resume: every stored event after the last one seen, exactly once, ending with an error
    // response to the interrupted request.
    let r = client.resume(last_seen.id.as_deref().unwrap()).await;
    assert_eq!(r.status(), 200);
    let mut sse = SseReader::new(r);
    let mut replayed = Vec::new();
    while let Some(e) = sse.next().await {
        replayed.push(e);
    }
    assert!(!replayed.is_empty());
    for (i, e) in replayed.iter().enumerate() {
        assert_eq!(
            e.index().unwrap(),
            last_seen.index().unwrap() + 1 + i as u64,
            "events must follow without gap or repeat: {replayed:?}"
        );
    }
    let last = replayed.last().unwrap().json();
    assert_eq!(last["id"], 7);
    assert_eq!(last["error"]["data"]["interrupted"], true, "{last}");
    for e in &replayed[..replayed.len() - 1] {
        assert_eq!(e.json()["method"], "notifications/progress");
    }
    // Resuming again replays the same events, no more, no fewer.
    let again: Vec<_> = {
        let mut sse = SseReader::new(client.resume(last_seen.id.as_deref().unwrap()).await);
        let mut v = Vec::new();
        while let Some(e) = sse.next().await {
            v.push(e.id.unwrap());
        }
        v
    };
    assert_eq!(
        again,
        replayed
            .iter()
            .map(|e| e.id.clone().unwrap())
            .collect::<Vec<_>>()
    );

    // The session goes on without a new initialize.
    let echo = client
        .call_tool(8, "echo", json!({"text":"still here"}))
        .await;
    assert_eq!(echo["result"]["content"][0]["text"], "still here", "{echo}");

    // Both tasks are pollable after the restart, and (sleep being idempotent) run to the end.
    let poll = client
        .request(9, "tasks/get", json!({"taskId": legacy_task}))
        .await;
    assert!(poll["result"]["status"].is_string(), "{poll}");
    let mut status = String::new();
    for i in 0..100 {
        let p = client
            .request(100 + i, "tasks/get", json!({"taskId": legacy_task}))
            .await;
        status = p["result"]["status"].as_str().unwrap().to_owned();
        if status == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, "completed");
    let result = client
        .request(300, "tasks/result", json!({"taskId": legacy_task}))
        .await;
    assert_eq!(
        result["result"]["content"][0]["text"], "Slept 3 seconds",
        "{result}"
    );
    assert_eq!(
        result["result"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
        legacy_task.as_str()
    );

    let mut ext = Value::Null;
    for i in 0..100 {
        let r = stateless(
            &http,
            &haven.url(),
            400 + i,
            "tasks/get",
            json!({"taskId": ext_task}),
            tasks_caps.clone(),
        )
        .await;
        ext = r.json().await.unwrap();
        if ext["result"]["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ext["result"]["status"], "completed", "{ext}");
    assert_eq!(
        ext["result"]["result"]["content"][0]["text"],
        "Slept 3 seconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_stream_replays_after_restart() {
    let home = Home::new();
    let mut haven = home.start("default", &["--legacy-responses", "sse"]).await;
    let client = Legacy::connect(&haven.url()).await;
    let r = client.post_raw(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"durable"}}})).await;
    let mut sse = SseReader::new(r);
    let priming = sse.next().await.unwrap();
    let result = sse.next().await.unwrap();
    assert_eq!(result.json()["result"]["content"][0]["text"], "durable");
    haven.kill9();
    let _haven = home.start("default", &[]).await;
    let mut sse = SseReader::new(client.resume(priming.id.as_deref().unwrap()).await);
    let replayed = sse.next().await.unwrap();
    assert_eq!(replayed.id, result.id);
    assert_eq!(replayed.data, result.data);
    assert!(sse.next().await.is_none());
}

/// A client whose stream's events came from a state since restored from a backup may name an
/// event index beyond the request's final event (the restored state settled the request
/// again, at lower indices): such a resumption gets the final event, the request's one
/// answer. A resumption at the final event's own index gets nothing more (the client has it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumption_past_the_final_event_gets_the_final_event() {
    let home = Home::new();
    let _haven = home.start("default", &["--legacy-responses", "sse"]).await;
    let client = Legacy::connect(&_haven.url()).await;
    let r = client.post_raw(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"once"}}})).await;
    let mut sse = SseReader::new(r);
    let _priming = sse.next().await.unwrap();
    let result = sse.next().await.unwrap();
    assert_eq!(result.json()["result"]["content"][0]["text"], "once");
    let id = result.id.clone().unwrap();
    let stream = id.rsplit_once('-').unwrap().0;
    let index = result.index().unwrap();
    for after in [index + 1, index + 5] {
        let after = format!("{stream}-{after}");
        let mut sse = SseReader::new(client.resume(&after).await);
        let replayed = sse.next().await.unwrap();
        assert_eq!(replayed.id, result.id, "resumed after {after}");
        assert_eq!(replayed.data, result.data, "resumed after {after}");
        assert!(sse.next().await.is_none(), "resumed after {after}");
    }
    let mut sse = SseReader::new(client.resume(&id).await);
    assert!(sse.next().await.is_none(), "resumed at the final event");
}

/// `POST /admin/v1/regions/takeover` on a node with no peer regions (as a region built from
/// another's backup is): its own region is refused, another region's work is taken over only
/// with the confirmation that every process of it is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_is_not_a_peer_is_taken_over_with_the_confirmation_alone() {
    let home = Home::new();
    let haven = home.start("default", &[]).await;
    let own = haven.status().await["region"]
        .as_str()
        .expect("the node's region")
        .to_owned();
    let token = std::fs::read_to_string(home.data.join("admin.token")).unwrap();
    let takeover = |query: String| {
        let token = token.trim().to_owned();
        let url = format!(
            "http://127.0.0.1:{}/admin/v1/regions/takeover?{query}",
            home.port
        );
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = takeover(format!("region={own}&confirm_dead=true")).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("own region"), "{v}");
    let (status, v) = takeover("region=gone".into()).await;
    assert_eq!(status, 409, "{v}");
    assert!(v.to_string().contains("--confirm-dead"), "{v}");
    let (status, v) = takeover("region=gone&confirm_dead=true".into()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"region": "gone", "taken": 0}));
}

/// Saves note `name` through the 2026-07-28 era: whether the node acknowledged it (`None`
/// when the node was unreachable or the answer was cut off).
async fn try_put_note(
    http: &reqwest::Client,
    url: &str,
    id: i64,
    name: &str,
    text: &str,
) -> Option<bool> {
    let r = try_stateless(
        http,
        url,
        id,
        "tools/call",
        json!({"name":"notes_put","arguments":{"name":name,"text":text}}),
        json!({}),
    )
    .await
    .ok()?;
    let v: Value = r.json().await.ok()?;
    Some(v["result"]["content"][0]["text"] == format!("Saved note {name}"))
}

/// The text every writer of the test below gives note `name`.
fn note_text(name: &str) -> String {
    format!("{name}:{}", "x".repeat(120))
}

/// Every acknowledged write survives `kill -9` after checkpoints have recycled the
/// write-ahead log's segment several times (one is taken at least every 2 000 commits, so
/// 6 000 acknowledged writes mean at least two): a restart replays the recycled segment's
/// own records and nothing of the older ones behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_after_the_log_was_recycled() {
    const WRITERS: usize = 4;
    const ACKED_BEFORE_KILL: usize = 6_000;
    // The write-ahead log is the embedded store's, also where the other tests run on
    // JetStream (HAVEN_TEST_NATS).
    const EMBEDDED: &[&str] = &["--store", "embedded"];
    let home = Home::new();
    let mut haven = home.start("default", EMBEDDED).await;
    let url = haven.url();
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let count_tx = std::sync::Arc::new(count_tx);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, count_tx) = (url.clone(), count_tx.clone());
        writers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut acked = Vec::new();
            // Bounded: the kill comes after 6 000 acknowledgements, long before 4 x 4 000.
            for i in 0..4_000 {
                let name = format!("w{w}-{i}");
                match try_put_note(&http, &url, i, &name, &note_text(&name)).await {
                    Some(true) => {
                        acked.push(name);
                        count_tx.send_modify(|n| *n += 1);
                    }
                    Some(false) => panic!("note {name} refused while the node ran"),
                    None => break,
                }
            }
            acked
        }));
    }
    count_rx
        .wait_for(|n| *n >= ACKED_BEFORE_KILL)
        .await
        .expect("the writers stopped before the kill");
    haven.kill9();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() >= ACKED_BEFORE_KILL);

    let haven = home.start("default", EMBEDDED).await;
    let segments: Vec<_> = std::fs::read_dir(home.data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(segments.len(), 1, "one recycled segment: {segments:?}");
    let mut readers = Vec::new();
    for chunk in acked.chunks(acked.len().div_ceil(WRITERS)) {
        let (url, chunk) = (haven.url(), chunk.to_vec());
        readers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut missing = Vec::new();
            for (i, name) in chunk.into_iter().enumerate() {
                let r = stateless(
                    &http,
                    &url,
                    i as i64,
                    "tools/call",
                    json!({"name":"notes_get","arguments":{"name":name}}),
                    json!({}),
                )
                .await;
                let v: Value = r.json().await.unwrap();
                if v["result"]["content"][0]["text"] != note_text(&name) {
                    missing.push((name, v));
                }
            }
            missing
        }));
    }
    let mut missing = Vec::new();
    for r in readers {
        missing.extend(r.await.unwrap());
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged notes lost or changed, e.g. {:?}",
        missing.len(),
        acked.len(),
        missing.first()
    );
}
