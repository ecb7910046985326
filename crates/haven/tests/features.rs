//! Features that span requests, checked on the real binary: notifications on the standalone
//! stream and on `subscriptions/listen`, cancellation, and request-state keys that survive a
//! restart.

mod common;

use std::time::Duration;

use common::{Haven, Home, Legacy, SseReader, free_port, stateless};
use futures::StreamExt;
use serde_json::{Value, json};

async fn next_json(sse: &mut SseReader) -> Value {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), sse.next())
            .await
            .expect("timed out")
            .expect("stream ended");
        if !e.data.is_empty() {
            return e.json();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_updates_and_list_changes_reach_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let c = Legacy::connect(&h.url()).await;
    let sub = c
        .request(1, "resources/subscribe", json!({"uri":"note://plan"}))
        .await;
    assert_eq!(sub["result"], json!({}));
    let get = c.open_standalone().await;
    assert_eq!(get.status(), 200);
    let mut standalone = SseReader::new(get);
    assert!(
        standalone.next().await.unwrap().data.is_empty(),
        "priming event first"
    );

    // A stateless listener for the same changes.
    let http = reqwest::Client::new();
    let r = stateless(&http, &h.url(), 77, "subscriptions/listen",
        json!({"notifications":{"resourcesListChanged":true,"resourceSubscriptions":["note://plan"]}}), json!({})).await;
    let mut listen = SseReader::new(r);
    let ack = next_json(&mut listen).await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert_eq!(
        ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        77
    );

    // A write from a stateless client is announced to both.
    let r = stateless(
        &http,
        &h.url(),
        2,
        "tools/call",
        json!({"name":"notes_put","arguments":{"name":"plan","text":"v1"}}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    while got.len() < 2 {
        let v = next_json(&mut standalone).await;
        got.push(v["method"].as_str().unwrap().to_owned());
        if v["method"] == "notifications/resources/updated" {
            assert_eq!(v["params"]["uri"], "note://plan");
        }
    }
    got.sort();
    assert_eq!(
        got,
        [
            "notifications/resources/list_changed",
            "notifications/resources/updated"
        ]
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let v = next_json(&mut listen).await;
        assert_eq!(
            v["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
            77
        );
        got.push(v["method"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(
        got,
        [
            "notifications/resources/list_changed",
            "notifications/resources/updated"
        ]
    );

    // After unsubscribing, updates of that note no longer reach the session.
    c.request(3, "resources/unsubscribe", json!({"uri":"note://plan"}))
        .await;
    c.call_tool(4, "notes_put", json!({"name":"plan","text":"v2"}))
        .await;
    let v = next_json(&mut standalone).await;
    assert_eq!(v["method"], "notifications/resources/list_changed", "{v}");
    let read = c
        .request(5, "resources/read", json!({"uri":"note://plan"}))
        .await;
    assert_eq!(read["result"]["contents"][0]["text"], "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_a_running_call() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let c = Legacy::connect(&h.url()).await;
    let r = c.post_raw(json!({"jsonrpc":"2.0","id":"slow","method":"tools/call","params":{"name":"sleep","arguments":{"seconds":60},"_meta":{"progressToken":1}}})).await;
    let mut sse = SseReader::new(r);
    sse.next().await.unwrap();
    let r = c.post_raw(json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"slow","reason":"test"}})).await;
    assert_eq!(r.status(), 202);
    // The call ends as cancelled (-32800), not after the 60 s it would sleep; the deadline
    // only guards against a hang.
    let answer = async {
        loop {
            let v = next_json(&mut sse).await;
            if v["id"] == "slow" {
                return v;
            }
        }
    };
    let v = tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("the cancelled call did not end within 30 s");
    assert_eq!(v["error"]["code"], -32800, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_state_keys_outlive_the_process() {
    let home = Home::new();
    let mut h = home.start("conformance", &[]).await;
    let http = reqwest::Client::new();
    let caps = json!({"elicitation":{}});
    let tool = json!({"name":"test_input_required_result_request_state","arguments":{}});
    let first: Value = stateless(&http, &h.url(), 1, "tools/call", tool.clone(), caps.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();
    let key = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();

    // The key that sealed the state is in Haven's store: a new process verifies it.
    h.kill9();
    let h = home.start("conformance", &[]).await;
    let mut retry = tool.clone();
    retry["inputResponses"] = json!({ key.clone(): {"action":"accept","content":{"ok":true}} });
    retry["requestState"] = json!(state);
    let done: Value = stateless(
        &http,
        &h.url(),
        2,
        "tools/call",
        retry.clone(),
        caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(done["result"]["resultType"], "complete", "{done}");

    // A tampered state is refused.
    retry["requestState"] = json!(format!("{state}x"));
    let bad: Value = stateless(&http, &h.url(), 3, "tools/call", retry, caps)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
}

/// The subscription limits (`limits.max_subscriptions_per_session`, `limits.max_uri_bytes`)
/// refuse one more subscription, or a URI too long, with invalid params naming the setting,
/// in both eras; what a session holds is unchanged, and a change of a limit applies to the
/// next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_bounded_per_session_and_in_length() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let http = reqwest::Client::new();
    let set = |key: &'static str, value: Value| h.set_setting(key, value);
    set("limits.max_subscriptions_per_session", json!(3)).await;
    let c = Legacy::connect(&h.url()).await;
    let subscribe = |id: i64, uri: String| {
        let c = &c;
        async move {
            c.request(id, "resources/subscribe", json!({ "uri": uri }))
                .await
        }
    };
    for i in 1..=3 {
        let v = subscribe(i, format!("note://n{i}")).await;
        assert_eq!(v["result"], json!({}), "{v}");
    }
    let over = subscribe(4, "note://n4".into()).await;
    assert_eq!(over["error"]["code"], -32602, "{over}");
    let msg = over["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("at most 3") && msg.contains("limits.max_subscriptions_per_session"),
        "{msg}"
    );
    // Subscribing again to a URI held is no new subscription.
    assert_eq!(subscribe(5, "note://n1".into()).await["result"], json!({}));
    // Another session is not affected.
    let other = Legacy::connect(&h.url()).await;
    let v = other
        .request(1, "resources/subscribe", json!({"uri": "note://n4"}))
        .await;
    assert_eq!(v["result"], json!({}), "{v}");
    // One unsubscribed frees a place.
    let v = c
        .request(6, "resources/unsubscribe", json!({"uri": "note://n1"}))
        .await;
    assert_eq!(v["result"], json!({}), "{v}");
    assert_eq!(subscribe(7, "note://n4".into()).await["result"], json!({}));
    assert_eq!(
        subscribe(8, "note://n5".into()).await["error"]["code"],
        -32602
    );

    // A URI over the length limit, at the default of 4096 bytes and after a change.
    let long = format!("note://{}", "x".repeat(5000));
    let v = other
        .request(2, "resources/subscribe", json!({ "uri": long }))
        .await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_uri_bytes"),
        "{v}"
    );
    set("limits.max_uri_bytes", json!(8192)).await;
    let v = other
        .request(3, "resources/subscribe", json!({ "uri": long }))
        .await;
    assert_eq!(v["result"], json!({}), "{v}");

    // Each subscription is a record of its own (not in the session's record), and they end
    // with their session.
    let live = |prefix: String| {
        let h = &h;
        async move {
            let v = h.admin_get("/admin/v1/regions?items=subscriptions").await;
            v["items"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| {
                    i["tombstone"] == json!(false)
                        && i["key"].as_str().unwrap().starts_with(&prefix)
                })
                .count()
        }
    };
    assert_eq!(live(format!("{}/", other.session)).await, 2);
    assert_eq!(live(format!("{}/", c.session)).await, 3);
    assert_eq!(other.delete().await.status(), 200);
    assert_eq!(live(format!("{}/", other.session)).await, 0);

    // The stateless era: one listen names at most as many resources.
    let uris: Vec<String> = (0..4).map(|i| format!("note://s{i}")).collect();
    let r = stateless(
        &http,
        &h.url(),
        9,
        "subscriptions/listen",
        json!({"notifications":{"resourceSubscriptions": uris}}),
        json!({}),
    )
    .await;
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], -32602, "{status} {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_subscriptions_per_session"),
        "{v}"
    );
}

/// `limits.max_session_bytes` refuses an `initialize` whose session would be larger, with
/// invalid params naming the setting; subscriptions, records of their own, do not count. `limits.max_tasks_per_session` refuses one
/// more task of a session while the others have not expired; another session is not
/// affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_size_and_tasks_per_session_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let http = reqwest::Client::new();
    h.set_setting("limits.max_session_bytes", json!(2048)).await;
    let init = |name: String| {
        http.post(h.url())
            .header("accept", "application/json, text/event-stream")
            .json(
                &json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                "protocolVersion": common::LEGACY, "capabilities": {},
                "clientInfo": {"name": name, "version": "1"}}}),
            )
            .send()
    };
    let r = init("x".repeat(4000)).await.unwrap();
    assert!(r.headers().get("mcp-session-id").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_session_bytes"),
        "{v}"
    );
    // Subscriptions are records of their own: they do not make the session larger.
    let c = Legacy::connect(&h.url()).await;
    for (id, ch) in [(1, "a"), (2, "b")] {
        let uri = format!("note://{}", ch.repeat(1500));
        let v = c
            .request(id, "resources/subscribe", json!({ "uri": uri }))
            .await;
        assert_eq!(v["result"], json!({}), "{v}");
    }
    // The session still works, holding what it held.
    let v = c
        .request(
            3,
            "tools/call",
            json!({"name":"echo","arguments":{"text":"hi"}}),
        )
        .await;
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");

    h.set_setting("limits.max_tasks_per_session", json!(2))
        .await;
    let task = |c: &Legacy, id: i64| {
        let c = c.with_url(&c.url);
        async move {
            c.request(
                id,
                "tools/call",
                json!({"name":"sleep","arguments":{"seconds":0},"task":{"ttl":600000}}),
            )
            .await
        }
    };
    for id in 10..12 {
        let v = task(&c, id).await;
        assert!(v["result"]["task"]["taskId"].is_string(), "{v}");
    }
    let v = task(&c, 12).await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_tasks_per_session"),
        "{v}"
    );
    let other = Legacy::connect(&h.url()).await;
    let v = task(&other, 1).await;
    assert!(v["result"]["task"]["taskId"].is_string(), "{v}");
}

/// `limits.max_notes` refuses a new note while the store holds that many (overwriting one
/// and deleting one are not refused, and a deletion makes room); `limits.max_note_bytes`
/// refuses a longer text. Both answer invalid params naming the setting and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_are_bounded_in_count_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let c = Legacy::connect(&h.url()).await;
    // Two notes before the limit is set: the count starts from what the store holds.
    for (id, name) in [(1, "a"), (2, "b")] {
        let v = c
            .call_tool(id, "notes_put", json!({"name": name, "text": "x"}))
            .await;
        assert_eq!(v["result"]["isError"], json!(false), "{v}");
    }
    h.set_setting("limits.max_notes", json!(3)).await;
    let put = |id: i64, name: &'static str, text: String| {
        let c = &c;
        async move {
            c.call_tool(id, "notes_put", json!({"name": name, "text": text}))
                .await
        }
    };
    assert_eq!(
        put(3, "c", "x".into()).await["result"]["isError"],
        json!(false)
    );
    let v = put(4, "d", "x".into()).await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_notes"),
        "{v}"
    );
    // Overwriting is not a new note; a deletion makes room.
    assert_eq!(
        put(5, "a", "y".into()).await["result"]["isError"],
        json!(false)
    );
    let v = c.call_tool(6, "notes_delete", json!({"name": "b"})).await;
    assert_eq!(v["result"]["isError"], json!(false), "{v}");
    assert_eq!(
        put(7, "d", "x".into()).await["result"]["isError"],
        json!(false)
    );
    let v = c.call_tool(8, "notes_list", json!({})).await;
    assert_eq!(v["result"]["content"][0]["text"], "a\nc\nd", "{v}");

    h.set_setting("limits.max_note_bytes", json!(10)).await;
    let v = put(9, "a", "z".repeat(11)).await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_note_bytes"),
        "{v}"
    );
    let v = c.call_tool(10, "notes_get", json!({"name": "a"})).await;
    assert_eq!(v["result"]["content"][0]["text"], "y", "{v}");
}

/// `limits.max_sessions_per_node`: one more `initialize` than the node may hold is answered
/// 503 with `Retry-After` and an error naming the setting (no session is made); ending a
/// session makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_node_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    h.set_setting("limits.max_sessions_per_node", json!(2))
        .await;
    let a = Legacy::connect(&h.url()).await;
    let _b = Legacy::connect(&h.url()).await;
    assert_eq!(h.status().await["live_sessions"], 2);
    let r = reqwest::Client::new()
        .post(h.url())
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion": common::LEGACY, "capabilities": {},
            "clientInfo": {"name": "third", "version": "1"}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert!(r.headers().get("mcp-session-id").is_none());
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_sessions_per_node"),
        "{v}"
    );
    assert_eq!(a.delete().await.status(), 200);
    assert_eq!(h.status().await["live_sessions"], 1);
    let c = Legacy::connect(&h.url()).await;
    let v = c.call_tool(1, "echo", json!({"text": "in"})).await;
    assert_eq!(v["result"]["content"][0]["text"], "in", "{v}");
}

/// Notes created and overwritten by many clients at once: every write succeeds (creations
/// contend for the count and are tried again; overwrites never contend), and the count is
/// exact afterwards (`limits.max_notes` refuses exactly the next creation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_note_writes_all_succeed_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let http = reqwest::Client::new();
    let put = |id: i64, name: String| {
        let (http, url) = (&http, h.url());
        async move {
            let r = stateless(
                http,
                &url,
                id,
                "tools/call",
                json!({"name":"notes_put","arguments":{"name": name, "text": "x"}}),
                json!({}),
            )
            .await;
            let status = r.status();
            let v: Value = r.json().await.unwrap();
            assert!(
                status == 200 && v["result"]["isError"] == json!(false),
                "{status} {v}"
            );
        }
    };
    let creations = futures::stream::iter(0..40)
        .map(|i| put(i, format!("n{i}")))
        .buffer_unordered(16)
        .collect::<Vec<()>>();
    creations.await;
    let overwrites = futures::stream::iter(0..40)
        .map(|i| put(100 + i, "n0".to_owned()))
        .buffer_unordered(16)
        .collect::<Vec<()>>();
    overwrites.await;
    h.set_setting("limits.max_notes", json!(40)).await;
    let r = stateless(
        &http,
        &h.url(),
        999,
        "tools/call",
        json!({"name":"notes_put","arguments":{"name":"one-more","text":"x"}}),
        json!({}),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], -32602, "{v}");
}

/// A ping in the stateless era, raw: (status, `Retry-After`, body).
async fn raw_ping(
    http: &reqwest::Client,
    url: &str,
    session: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(s) = session {
        req = req
            .header("mcp-session-id", s)
            .header("mcp-protocol-version", common::LEGACY);
    }
    let r = req
        .body(json!({"jsonrpc":"2.0","id":1,"method":"ping","params":{}}).to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    (
        status,
        retry,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Admission control: a node serves at most `limits.max_requests` requests at once (open
/// response streams included) and a session `limits.max_requests_per_session`; over them a
/// request is answered at once — 503 or 429 with `Retry-After` — or waits in the bounded
/// queue for a place that frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_admission_limits_are_refused_at_once_or_queued() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let http = reqwest::Client::new();
    // One session with its standalone stream open: at a limit of one per session, its next
    // request is refused with 429 while another session is served.
    let c = Legacy::connect(&h.url()).await;
    h.set_setting("limits.max_requests_per_session", json!(1))
        .await;
    let stream = c.open_standalone().await;
    assert_eq!(stream.status(), 200);
    let (status, retry, v) = raw_ping(&http, &h.url(), Some(&c.session)).await;
    assert_eq!((status, retry.as_deref()), (429, Some("1")), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_requests_per_session"),
        "{v}"
    );
    let other = Legacy::connect(&h.url()).await;
    assert_eq!(
        other.request(2, "ping", json!({})).await["result"],
        json!({})
    );
    let third = Legacy::connect(&h.url()).await;
    // The stream ends: the session is served again.
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while raw_ping(&http, &h.url(), Some(&c.session)).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The node at its limit of two, with no queue: a third request is refused at once.
    h.set_setting("limits.max_queued_requests", json!(0)).await;
    h.set_setting("limits.max_requests", json!(2)).await;
    let first = long_call(&c, 10).await;
    let second = long_call(&other, 11).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let (status, retry, v) = raw_ping(&http, &h.url(), None).await;
    assert_eq!((status, retry.as_deref()), (503, Some("1")), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_requests"),
        "{v}"
    );
    // With a queue, the request waits for the place the first call's stream frees.
    h.set_setting("limits.max_queued_requests", json!(8)).await;
    h.set_setting("limits.queue_wait_ms", json!(10_000)).await;
    let waiting = {
        let (http, url, session) = (http.clone(), h.url(), third.session.clone());
        tokio::spawn(async move { raw_ping(&http, &url, Some(&session)).await.0 })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "the request did not wait for a place"
    );
    drop(first);
    assert_eq!(waiting.await.unwrap(), 200);
    drop(second);
}

/// A 30 s `sleep` call of `client`'s session whose answer is a stream (open until dropped).
async fn long_call(client: &Legacy, id: i64) -> reqwest::Response {
    client
        .post_raw(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":30},"_meta":{"progressToken":format!("p{id}")}}}))
        .await
}

/// A legacy call whose client left and whose stream nobody resumes is cancelled after
/// `limits.abandoned_call_ms`; one whose stream a client resumed (on any node) runs to its
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_nobody_awaits_is_cancelled_and_a_resumed_one_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    h.set_setting("limits.abandoned_call_ms", json!(1000)).await;
    let running = || async { h.status().await["running_requests"].as_u64().unwrap() };

    // Left: a 60 s call, its client gone after the first progress event.
    let c = Legacy::connect(&h.url()).await;
    let mut sse = SseReader::new(long_call(&c, 1).await);
    let _priming = sse.next().await.unwrap();
    let first = sse.next().await.unwrap().id.unwrap();
    drop(sse);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while running().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned call still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its stream ends with the cancellation, for a client that comes back after all.
    let mut back = SseReader::new(c.resume(&first).await);
    let last = last_of(&mut back).await;
    assert_eq!(last["id"], 1, "{last}");
    assert!(
        last.get("error").is_some() || last["result"]["isError"] == true,
        "{last}"
    );

    // Resumed at once: the call runs to its answer although the first client left.
    let c = Legacy::connect(&h.url()).await;
    let resp = c
        .post_raw(json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":3},"_meta":{"progressToken":"p2"}}}))
        .await;
    let mut sse = SseReader::new(resp);
    let _priming = sse.next().await.unwrap();
    let first = sse.next().await.unwrap().id.unwrap();
    drop(sse);
    let mut resumed = SseReader::new(c.resume(&first).await);
    let last = last_of(&mut resumed).await;
    assert_eq!(last["id"], 2, "{last}");
    assert!(
        last["result"].is_object() && last["result"]["isError"] != true,
        "{last}"
    );
}

/// The last message of a stream, read to its end (bounded: 30 s).
async fn last_of(sse: &mut SseReader) -> Value {
    let mut last = Value::Null;
    let read = async {
        while let Some(e) = sse.next().await {
            if !e.data.is_empty() {
                last = e.json();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream did not end");
    last
}

/// A task whose record expires while its handler runs is stopped: nobody can poll or cancel
/// it any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_record_expires_stops_running() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let executions = || async { h.status().await["running_executions"].as_u64().unwrap() };
    let c = Legacy::connect(&h.url()).await;
    let created = c
        .request(
            1,
            "tools/call",
            json!({"name":"sleep","arguments":{"seconds":120},"task":{"ttl":1500}}),
        )
        .await;
    let task = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(executions().await, 1, "{created}");
    // Past its time-to-live the task is gone, and within the re-check interval so is its run.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while executions().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired task's handler still runs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = c.request(2, "tasks/get", json!({"taskId": task})).await;
    assert!(v.get("error").is_some(), "{v}");
}

/// A standalone GET stream stays resumable while its client may come back, and leaves no
/// record behind once nobody did within `limits.abandoned_call_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_stream_nobody_resumes_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    h.set_setting("limits.abandoned_call_ms", json!(1000)).await;
    let c = Legacy::connect(&h.url()).await;
    let mut sse = SseReader::new(c.open_standalone().await);
    let priming = sse.next().await.unwrap().id.unwrap();
    drop(sse);
    // Back at once: resumed.
    let back = c.resume(&priming).await;
    assert_eq!(back.status(), 200);
    drop(back);
    // Not back within the window: the stream's record is gone, and resuming it says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.resume(&priming).await;
        if r.status() == 400 {
            let v: Value = r.json().await.unwrap();
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("names no stream"),
                "{v}"
            );
            break;
        }
        drop(r);
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned standalone stream is still resumable"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

/// A call that runs longer than `limits.max_call_ms` is cancelled: its stream ends with the
/// cancellation, and nothing of it runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_longer_than_the_limit_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    h.set_setting("limits.max_call_ms", json!(1000)).await;
    let c = Legacy::connect(&h.url()).await;
    let started = std::time::Instant::now();
    let mut sse = SseReader::new(long_call(&c, 1).await);
    let last = last_of(&mut sse).await;
    assert_eq!(last["id"], 1, "{last}");
    assert!(
        last.get("error").is_some() || last["result"]["isError"] == true,
        "{last}"
    );
    // Far less than the call's 30 s (how long exactly is not the point).
    assert!(started.elapsed() < std::time::Duration::from_secs(25));
}
