//! Exactly one final answer per request under cluster faults, with real processes on loopback:
//! three nats-servers in one JetStream cluster, three Haven nodes, HAProxy in front, and the
//! faults done to them for real (`kill -9`, SIGSTOP/SIGCONT, the stream leader killed, the
//! whole NATS cluster stopped, clocks moved with libfaketime).
//!
//! Every test checks the invariant the same way: the whole stored stream of each request is
//! read back from a node (GET with `Last-Event-ID: <stream>-0`, until the stream ends after its
//! final event), then read again after the final to make sure nothing follows it, and the
//! responses carrying the request's id are counted: exactly one. Waits are conditions with
//! deadlines; the only timed holds are the faults themselves (how long a node stays stopped,
//! how long NATS stays down).

mod common;

use std::time::{Duration, Instant};

use common::cluster::{ONE_REGION_AT_A_TIME, Region, haven_status};
use common::{Event, Legacy, SseReader, stateless};
use serde_json::{Value, json};

/// What a node logs when it runs an interrupted idempotent call again (a takeover).
const RERUN: &str = "running an interrupted idempotent tool call again";
/// What a node logs when it ends an interrupted request with an error (a takeover).
const SETTLED: &str = "ended the stream of an interrupted request";
/// What a node that lost an execution it was running logs.
const LOST: &str = "this node lost a request it was running";
/// The same, found at a write of the handler itself.
const REFUSED: &str = "a write of a handler was refused: this node no longer owns its execution";

/// What a node logs when its presence probes found a silent node's store connection gone (it
/// takes over that node's work before the heartbeat's time-to-live runs out).
const GONE: &str = "the store connection of a silent node is gone";
/// What a node logs when a silent node's presence probe was answered or went unanswered (its
/// connection is still open: nothing is taken over before the time-to-live).
const KEPT: &str = "a silent node's store connection is still open";

/// What a node logs when another node's clock is off by more than the allowed skew.
const SKEW_WARNING: &str =
    "the clock of another node differs from this node's by more than the allowed skew";

/// Bound of any single HTTP exchange of these tests (a hang guard, not a measurement).
const HANG_GUARD: Duration = Duration::from_secs(60);

/// How long a client waits on a silent stream before it resumes, and the bound for all the
/// calls of a test to finish, unless a test says otherwise.
const IDLE: Duration = Duration::from_secs(10);
const WITHIN: Duration = Duration::from_secs(90);

/// One long `sleep` call of a legacy client, as the client holds it.
struct Call {
    /// The client's session; `url` is the node the call was sent to.
    client: Legacy,
    /// JSON-RPC id of the call.
    id: i64,
    /// Its progress token.
    token: String,
    /// The stream id (from the priming event `<stream>-0`).
    stream: String,
    /// The node that answered the POST (`x-haven-node`).
    node: String,
    /// Seconds of sleep.
    seconds: u64,
    /// The open SSE connection, if any.
    sse: Option<SseReader>,
    /// Id of the last event received.
    last_id: String,
    /// Every event with data the client received, over all its connections.
    received: Vec<Event>,
    /// How many of `received` came before the first resumption.
    before_resume: Option<usize>,
    /// The final response, once received.
    answer: Option<Value>,
}

impl Call {
    /// The events received after the client resumed on another connection.
    fn resumed(&self) -> &[Event] {
        &self.received[self.before_resume.unwrap_or(self.received.len())..]
    }

    fn label(&self) -> String {
        format!(
            "call {} (sleep {} s, token {}, stream {}, on {})",
            self.id, self.seconds, self.token, self.stream, self.node
        )
    }
}

/// Whether `v` is a JSON-RPC response (result or error) to request `id`.
fn is_response_to(v: &Value, id: i64) -> bool {
    v.get("id") == Some(&json!(id)) && (v.get("result").is_some() || v.get("error").is_some())
}

/// Whether `v` is any JSON-RPC response.
fn is_response(v: &Value) -> bool {
    v.get("method").is_none() && (v.get("result").is_some() || v.get("error").is_some())
}

/// The progress value of a progress notification with `token`; panics on a progress
/// notification with another token.
fn progress(v: &Value, token: &str) -> Option<f64> {
    if v.get("method") != Some(&json!("notifications/progress")) {
        return None;
    }
    assert_eq!(
        v["params"]["progressToken"],
        json!(token),
        "a progress notification with another token: {v}"
    );
    v["params"]["progress"].as_f64()
}

/// Opens a session on `url` and starts `sleep` for `seconds` with a progress token there;
/// returns once the call's stream is open and its first progress notification arrived.
async fn start_call(url: &str, id: i64, token: &str, seconds: u64) -> Call {
    let client = tokio::time::timeout(HANG_GUARD, Legacy::connect(url))
        .await
        .expect("initialize answered");
    let r = tokio::time::timeout(
        HANG_GUARD,
        client.post_raw(
            json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{
            "name":"sleep","arguments":{"seconds":seconds},"_meta":{"progressToken":token}}}),
        ),
    )
    .await
    .expect("the call is answered");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "a long call is answered with a stream"
    );
    let node = r.headers()["x-haven-node"].to_str().unwrap().to_owned();
    let mut sse = SseReader::new(r);
    let priming = tokio::time::timeout(HANG_GUARD, sse.next())
        .await
        .expect("the priming event arrives")
        .expect("the stream has a priming event");
    let last_id = priming.id.clone().expect("the priming event has an id");
    let (stream, index) = last_id.rsplit_once('-').unwrap();
    assert_eq!(
        index, "0",
        "the first event is the priming event: {priming:?}"
    );
    let mut call = Call {
        client,
        id,
        token: token.to_owned(),
        stream: stream.to_owned(),
        node,
        seconds,
        sse: Some(sse),
        last_id,
        received: Vec::new(),
        before_resume: None,
        answer: None,
    };
    read_live(&mut call, |v| {
        v.get("method") == Some(&json!("notifications/progress"))
    })
    .await;
    call
}

/// Records one received event.
fn record(call: &mut Call, e: Event) -> Value {
    if let Some(id) = &e.id {
        call.last_id = id.clone();
    }
    let v = e.json();
    if is_response_to(&v, call.id) {
        call.answer = Some(v.clone());
    }
    call.received.push(e);
    v
}

/// Reads the call's open connection until an event satisfies `until` (panics if the connection
/// ends first).
async fn read_live(call: &mut Call, until: impl Fn(&Value) -> bool) {
    loop {
        let sse = call.sse.as_mut().expect("an open connection");
        let e = tokio::time::timeout(HANG_GUARD, sse.next())
            .await
            .unwrap_or_else(|_| panic!("no event within {HANG_GUARD:?}"))
            .unwrap_or_else(|| panic!("the stream of {} ended early", call.stream));
        if e.data.is_empty() {
            continue;
        }
        let v = record(call, e);
        if until(&v) {
            return;
        }
    }
}

/// Reads the live stream of every call until its progress reached `at_least`.
async fn read_until_progress(calls: &mut [Call], at_least: f64) {
    futures::future::join_all(calls.iter_mut().map(|c| {
        let token = c.token.clone();
        async move { read_live(c, |v| progress(v, &token).is_some_and(|p| p >= at_least)).await }
    }))
    .await;
}

/// Reads the call's stream until an event satisfies `until`, resuming with `Last-Event-ID` at
/// `urls` (in turn) whenever the connection ends or stays silent for `idle`.
async fn follow_until(
    call: &mut Call,
    urls: &[String],
    idle: Duration,
    deadline: Instant,
    until: impl Fn(&Value) -> bool,
) {
    let mut attempt = 0usize;
    loop {
        assert!(
            Instant::now() < deadline,
            "{}: the awaited event did not arrive; received {:?}",
            call.label(),
            call.received
        );
        let Some(sse) = call.sse.as_mut() else {
            let url = &urls[attempt % urls.len()];
            attempt += 1;
            let resumed = tokio::time::timeout(
                Duration::from_secs(10),
                call.client.with_url(url).resume(&call.last_id),
            )
            .await;
            match resumed {
                Ok(r) if r.status() == 200 => {
                    call.before_resume.get_or_insert(call.received.len());
                    call.sse = Some(SseReader::new(r));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            continue;
        };
        match tokio::time::timeout(idle, sse.next()).await {
            Ok(Some(e)) => {
                if e.data.is_empty() {
                    continue;
                }
                let v = record(call, e);
                if until(&v) {
                    return;
                }
            }
            // The connection ended or went silent: resume elsewhere.
            _ => call.sse = None,
        }
    }
}

/// Reads the call's stream (resuming at `urls` as needed) until its final response.
async fn finish(call: &mut Call, urls: &[String], idle: Duration, deadline: Instant) {
    if call.answer.is_some() {
        return;
    }
    let id = call.id;
    follow_until(call, urls, idle, deadline, |v| is_response_to(v, id)).await;
    // The stream ends after its final event.
    if let Some(mut sse) = call.sse.take() {
        let rest = tokio::time::timeout(Duration::from_secs(10), sse.next()).await;
        if let Ok(Some(e)) = rest {
            panic!("{}: an event after the final one: {e:?}", call.label());
        }
    }
}

/// A request's stream as stored, read back from a node.
#[derive(Debug)]
struct Stored {
    /// Every stored event, in order: (index, message).
    events: Vec<(u64, Value)>,
    /// Events found after the stream's end (must be none).
    after_end: Vec<(u64, Value)>,
}

/// Reads a request's whole stored stream back from `url`: from `Last-Event-ID: <stream>-0`
/// until the stream ends (after its final event), then once more from the last event to make
/// sure nothing follows and that nothing is in flight any more (the stream of a request still
/// in flight stays open).
async fn read_back(url: &str, session: &str, stream: &str, deadline: Instant) -> Stored {
    let client = Legacy {
        client: reqwest::Client::new(),
        url: url.to_owned(),
        session: session.to_owned(),
    };
    let mut events: Vec<(u64, Value)> = Vec::new();
    // Until the end of the stream (a connection that breaks or goes silent is resumed).
    loop {
        assert!(
            Instant::now() < deadline,
            "stream {stream}: not ended when read back from {url}; read {events:?}"
        );
        let after = events.last().map_or(0, |e| e.0);
        let Ok(r) = tokio::time::timeout(
            Duration::from_secs(10),
            client.resume(&format!("{stream}-{after}")),
        )
        .await
        else {
            continue;
        };
        if r.status() != 200 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut sse = SseReader::new(r);
        let mut ended = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(15), sse.next()).await {
                Ok(Some(e)) => {
                    if e.data.is_empty() {
                        continue;
                    }
                    events.push((e.index().unwrap(), e.json()));
                }
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if ended && events.last().is_some_and(|(_, v)| is_response(v)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing after the final event, and the stream ends at once (nothing in flight).
    let last = events.last().unwrap().0;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        client.resume(&format!("{stream}-{last}")),
    )
    .await
    .expect("resuming after the final event is answered");
    assert_eq!(r.status(), 200);
    let mut sse = SseReader::new(r);
    let mut after_end = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(15), sse.next()).await {
            Ok(Some(e)) => {
                if !e.data.is_empty() {
                    after_end.push((e.index().unwrap(), e.json()));
                }
            }
            Ok(None) => break,
            Err(_) => panic!(
                "stream {stream}: still open after its final event (in flight?); after it: {after_end:?}"
            ),
        }
    }
    Stored { events, after_end }
}

/// Checks that a stored stream holds exactly one final response, to `call`, as its last event,
/// with nothing after it and no gap in the indexes; that every event the client received is
/// stored as received; and that every progress notification carries the call's token. Returns
/// the progress values in stream order.
fn check_one_final(call: &Call, stored: &Stored) -> Vec<f64> {
    let label = call.label();
    let all: Vec<&(u64, Value)> = stored.events.iter().chain(&stored.after_end).collect();
    let finals = all
        .iter()
        .filter(|(_, v)| is_response_to(v, call.id))
        .count();
    let responses = all.iter().filter(|(_, v)| is_response(v)).count();
    assert_eq!(
        finals, 1,
        "{label}: {finals} final responses stored; stream: {stored:#?}"
    );
    assert_eq!(
        responses, 1,
        "{label}: responses to other ids stored: {stored:#?}"
    );
    assert!(
        stored.after_end.is_empty(),
        "{label}: events after the final one: {stored:#?}"
    );
    assert!(
        is_response_to(&stored.events.last().unwrap().1, call.id),
        "{label}: the final response is not the last event: {stored:#?}"
    );
    let indexes: Vec<u64> = stored.events.iter().map(|e| e.0).collect();
    let expected: Vec<u64> = (1..=indexes.len() as u64).collect();
    assert_eq!(indexes, expected, "{label}: stream indexes");
    for e in &call.received {
        let i = e.index().unwrap() as usize;
        assert!(
            i >= 1 && i <= stored.events.len() && stored.events[i - 1].1 == e.json(),
            "{label}: the client received {e:?}, which is not stored as such: {stored:#?}"
        );
    }
    stored
        .events
        .iter()
        .filter_map(|(_, v)| progress(v, &call.token))
        .collect()
}

/// `0, 1, …, n` as progress values.
fn counting(n: u64) -> Vec<f64> {
    (0..=n).map(|x| x as f64).collect()
}

/// Checks the progress values of a re-run stream: the first run counted `0..=k` before its
/// node went away; the re-run counts `0..=seconds` again, and only its values past `k` reach
/// the stream, so that one token's progress keeps increasing (MCP requires it): the stream
/// counts `0..=seconds` once.
fn assert_rerun_progress(label: &str, values: &[f64], seconds: u64) {
    assert_eq!(
        values,
        &counting(seconds)[..],
        "{label}: the first run's progress values, then the re-run's past them: {values:?}"
    );
}

/// Checks that progress values strictly increase.
fn assert_increasing(label: &str, values: &[f64]) {
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "{label}: progress values that do not increase: {values:?}"
    );
}

/// Checks that no node took anything over and no node lost an execution.
fn assert_no_takeover(region: &Region) {
    for what in [RERUN, SETTLED, LOST, REFUSED] {
        let counts = region.count_logged(&[what]);
        assert!(
            counts.iter().all(|c| *c == 0),
            "no takeover expected, but nodes logged \"{what}\" {counts:?} times"
        );
    }
}

/// Starts `per_node` calls on every node (each on its own session, sent to that node).
async fn calls_on_every_node(
    region: &Region,
    per_node: usize,
    seconds: u64,
    tag: &str,
) -> Vec<Call> {
    let mut starts = Vec::new();
    for n in 0..3 {
        for k in 0..per_node {
            let url = region.node_url(n);
            let id = 10 + (n * per_node + k) as i64;
            let token = format!("{tag}-n{n}-{k}");
            starts.push(async move { start_call(&url, id, &token, seconds).await });
        }
    }
    futures::future::join_all(starts).await
}

/// Reads every call to its end (resuming at `urls`), then reads each stream back from a node
/// other than the one the call started on and checks it; returns the progress values of each.
async fn finish_and_check(
    region: &Region,
    calls: &mut [Call],
    urls: &[String],
    idle: Duration,
    within: Duration,
) -> Vec<Vec<f64>> {
    let deadline = Instant::now() + within;
    futures::future::join_all(calls.iter_mut().map(|c| finish(c, urls, idle, deadline))).await;
    let mut out = Vec::new();
    for c in calls.iter() {
        let started_on = region.index_of_node(&c.node);
        let reader = (0..3)
            .map(|k| (started_on + 1 + k) % 3)
            .find(|i| region.nodes[*i].is_some())
            .unwrap();
        let stored = read_back(
            &region.node_url(reader),
            &c.client.session,
            &c.stream,
            Instant::now() + Duration::from_secs(60),
        )
        .await;
        out.push(check_one_final(c, &stored));
    }
    out
}

/// Finishes every call and checks its stream (see [`finish_and_check`]); asserts that each
/// counted all its `seconds`, none missing or repeated, and ended with a tool result.
async fn finish_counting(
    region: &Region,
    calls: &mut [Call],
    seconds: u64,
    idle: Duration,
    within: Duration,
) {
    let urls = running_urls(region);
    let values = finish_and_check(region, calls, &urls, idle, within).await;
    for (c, values) in calls.iter().zip(&values) {
        assert_eq!(values, &counting(seconds), "{}", c.label());
        assert!(c.answer.as_ref().unwrap()["result"]["content"].is_array());
    }
}

/// Asserts that exactly one node logged a re-run of `stream`, and not node `victim`.
fn assert_rerun_once_elsewhere(region: &Region, stream: &str, victim: usize, label: &str) {
    let reruns = region.count_logged(&[RERUN, stream]);
    assert_eq!(
        reruns.iter().sum::<usize>(),
        1,
        "{label}: re-runs logged per node: {reruns:?}"
    );
    assert_eq!(reruns[victim], 0, "{label}: re-run by a surviving node");
}

/// The URLs of the running nodes.
fn running_urls(region: &Region) -> Vec<String> {
    (0..3)
        .filter(|i| region.nodes[*i].is_some())
        .map(|i| region.node_url(i))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_of_a_node_reruns_each_of_its_idempotent_calls_exactly_once() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    const SECONDS: u64 = 5;
    for round in 0..3usize {
        let victim = round;
        let url = region.node_url(victim);
        let mut calls = futures::future::join_all((0..5).map(|k| {
            let url = url.clone();
            async move { start_call(&url, 100 + k, &format!("r{round}-c{k}"), SECONDS).await }
        }))
        .await;
        for c in &calls {
            assert_eq!(c.node, format!("node{victim}"));
        }
        region.kill9(victim);

        // Every client resumes through the proxy and gets the re-run's result.
        let proxy = vec![region.proxy.url()];
        let values = finish_and_check(&region, &mut calls, &proxy, IDLE, WITHIN).await;
        for (c, values) in calls.iter().zip(&values) {
            let label = c.label();
            let answer = c.answer.as_ref().unwrap();
            assert!(
                answer["result"]["content"].is_array() && answer["result"]["isError"] != true,
                "{label}: the re-run's result: {answer}"
            );
            // The stream is the first run's progress, then the re-run's past it, with the
            // client's token (checked by `progress`), then the result.
            assert_rerun_progress(&label, values, SECONDS);
            // The client saw the re-run in the stream it resumed: its progress up to the end
            // (the first run was killed well before it), and the result.
            let resumed: Vec<f64> = c
                .resumed()
                .iter()
                .filter_map(|e| progress(&e.json(), &c.token))
                .collect();
            assert_eq!(
                resumed.last(),
                Some(&(SECONDS as f64)),
                "{label}: progress received after resuming: {resumed:?}"
            );
            // Over the whole call, before the kill and after resuming, the client's progress
            // values strictly increase.
            let seen: Vec<f64> = c
                .received
                .iter()
                .filter_map(|e| progress(&e.json(), &c.token))
                .collect();
            assert!(c.before_resume.is_some(), "{label}: the client resumed");
            assert_increasing(&label, &seen);
            assert!(
                c.resumed().iter().any(|e| is_response_to(&e.json(), c.id)),
                "{label}: the result arrived in the resumed stream"
            );
            // Exactly one surviving node ran it again; nobody ended it with an error.
            assert_rerun_once_elsewhere(&region, &c.stream, victim, &label);
            let settled = region.count_logged(&[SETTLED, &c.stream]);
            assert_eq!(settled.iter().sum::<usize>(), 0, "{label}: {settled:?}");
        }
        // The survivors found the killed process's store connection gone (presence probes),
        // which is what let them take over before the heartbeat's time-to-live ran out.
        let victim_field = format!("node=node{victim}");
        let gone = region.count_logged(&[GONE, &victim_field]);
        assert!(
            gone.iter().sum::<usize>() >= 1 && gone[victim] == 0,
            "round {round}: survivors logging node{victim}'s store connection gone: {gone:?}"
        );
        // The killed node's heartbeat only grew old: the survivors report it silent, not
        // its clock skewed (all the nodes share this machine's clock), and nobody warned
        // of skew.
        for survivor in (0..3).filter(|i| *i != victim) {
            let st = region
                .node_status(survivor)
                .await
                .expect("a survivor's status");
            let seen = st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["info"]["node"] == format!("node{victim}"))
                .cloned()
                .unwrap_or_default();
            assert!(
                seen["clock_skewed"] != true && st["clock"]["skewed"] != true,
                "round {round}: node{survivor} takes node{victim}'s old heartbeat for skew: {st}"
            );
        }
        let skew = region.count_logged(&[SKEW_WARNING]);
        assert!(
            skew.iter().all(|c| *c == 0),
            "round {round}: skew warnings: {skew:?}"
        );
        region.restart_node(victim).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_node_woken_from_sigstop_after_a_takeover_writes_nothing_into_the_stream() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let region = Region::start().await;
    const SECONDS: u64 = 12;
    let victim = 1;
    let mut call = start_call(&region.node_url(victim), 7, "paused", SECONDS).await;
    let node = region.nodes[victim].as_ref().unwrap();
    node.pause();
    let paused_at = Instant::now();

    // Another node takes the call over and runs it again; the client follows it there. The
    // stopped node is woken while the re-run is half-way: its own run's timers have all
    // expired by then, so it tries to write the rest of its progress and its final answer.
    let survivors = vec![region.node_url(0), region.node_url(2)];
    let deadline = Instant::now() + Duration::from_secs(90);
    follow_until(
        &mut call,
        &survivors,
        Duration::from_secs(5),
        deadline,
        |v| progress(v, "paused").is_some_and(|p| p >= 8.0),
    )
    .await;
    node.resume();
    let paused_for = paused_at.elapsed();

    // The woken node finds out that it lost the request and stops its handler.
    let lost_deadline = Instant::now() + Duration::from_secs(30);
    let lost = loop {
        let lost = region
            .log_lines(victim)
            .into_iter()
            .find(|l| (l.contains(LOST) || l.contains(REFUSED)) && l.contains(&call.stream));
        if let Some(line) = lost {
            break line;
        }
        assert!(
            Instant::now() < lost_deadline,
            "the woken node did not log that it lost the request; its log:\n{}",
            region.log_lines(victim).join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    finish(&mut call, &survivors, Duration::from_secs(10), deadline).await;
    let answer = call.answer.clone().unwrap();
    assert!(
        answer["result"]["content"].is_array(),
        "the re-run's result: {answer}"
    );
    // Read back on every node, the woken one included: one final, and the stream is exactly
    // the first run's progress until the stop, then the re-run's past it — nothing the woken
    // node produced after waking (its progress from 1 up, its own final answer).
    for reader in 0..3 {
        let stored = read_back(
            &region.node_url(reader),
            &call.client.session,
            &call.stream,
            Instant::now() + Duration::from_secs(60),
        )
        .await;
        let values = check_one_final(&call, &stored);
        assert_rerun_progress(&call.label(), &values, SECONDS);
    }
    let seen: Vec<f64> = call
        .received
        .iter()
        .filter_map(|e| progress(&e.json(), &call.token))
        .collect();
    assert_increasing(&call.label(), &seen);
    assert_rerun_once_elsewhere(&region, &call.stream, victim, &call.label());
    // A stopped process keeps its store connection: it was taken over by the heartbeat's
    // time-to-live, never by the presence probes.
    let gone = region.count_logged(&[GONE]);
    assert!(gone.iter().all(|c| *c == 0), "{GONE}: {gone:?}");
    eprintln!("node{victim} was stopped for {paused_for:.1?}; on waking it logged: {lost}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_killing_the_stream_leader_causes_no_takeover_and_loses_no_progress() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    const SECONDS: u64 = 10;
    let mut calls = calls_on_every_node(&region, 2, SECONDS, "leader").await;
    let leader = region.stream_leader().await;
    let leader_name = region.nats.servers[leader].name.clone();
    region.nats.kill9(leader);

    let urls = running_urls(&region);
    let values = finish_and_check(&region, &mut calls, &urls, IDLE, WITHIN).await;
    for (c, values) in calls.iter().zip(&values) {
        assert_eq!(
            values,
            &counting(SECONDS),
            "{}: one progress notification per second, none missing or repeated",
            c.label()
        );
        let answer = c.answer.as_ref().unwrap();
        assert!(answer["result"]["content"].is_array(), "{answer}");
    }
    assert_no_takeover(&region);
    let st = region.status().await;
    assert_ne!(
        st["store"]["leader"].as_str(),
        Some(leader_name.as_str()),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d1_a_leader_kill_as_calls_finish_drops_no_final() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    const SECONDS: u64 = 5;
    let mut calls = calls_on_every_node(&region, 2, SECONDS, "finish").await;
    // Each call is one second from its final answer when the leader dies.
    read_until_progress(&mut calls, (SECONDS - 1) as f64).await;
    let leader = region.stream_leader().await;
    region.nats.kill9(leader);

    finish_counting(&region, &mut calls, SECONDS, IDLE, WITHIN).await;
    assert_no_takeover(&region);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d2_a_full_nats_outage_as_calls_finish_drops_no_final() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    const SECONDS: u64 = 6;
    let mut calls = calls_on_every_node(&region, 2, SECONDS, "outage").await;
    read_until_progress(&mut calls, (SECONDS - 3) as f64).await;
    // Every nats-server stops; the calls finish meanwhile (their last progress and final
    // answers cannot be stored); NATS stays down for 20 s (the fault's length, longer than
    // the heartbeat time-to-live), then comes back.
    let outage_started = Instant::now();
    for i in 0..3 {
        region.nats.kill9(i);
    }
    region.wait_readyz(503, Duration::from_secs(30)).await;
    tokio::time::sleep_until((outage_started + Duration::from_secs(20)).into()).await;
    for i in 0..3 {
        region.nats.restart(i).await;
    }

    // The clients stay on their connections (a long idle bound): the answers stored after the
    // outage reach them there, or through a resumption.
    finish_counting(
        &region,
        &mut calls,
        SECONDS,
        Duration::from_secs(60),
        Duration::from_secs(180),
    )
    .await;
    // Nothing is left in flight: every stream ended (checked by `read_back`), and no node runs
    // a request any more.
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..3 {
        loop {
            let running = region
                .node_status(i)
                .await
                .and_then(|s| s["running_requests"].as_u64());
            if running == Some(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node{i} still runs {running:?} requests"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // The outage did hit the calls' writes: they were retried until stored.
    let retried = region.count_logged(&["stream events stored after retries"]);
    assert!(
        retried.iter().sum::<usize>() >= 1,
        "no stream write was retried across the outage: {retried:?}"
    );
    // Everyone's silence during the outage was the store's, not the nodes': nobody took
    // anything over.
    assert_no_takeover(&region);
    region.wait_readyz(200, Duration::from_secs(60)).await;
}

/// The libfaketime library that moves a process's wall clock, if installed (Debian package
/// `faketime`, installed by scripts/install-tools).
fn faketime_lib() -> Option<std::path::PathBuf> {
    let mut dirs = vec![std::path::PathBuf::from("/usr/lib")];
    if let Ok(rd) = std::fs::read_dir("/usr/lib") {
        dirs.extend(rd.flatten().map(|e| e.path()));
    }
    dirs.push("/usr/lib64".into());
    dirs.push("/usr/local/lib".into());
    dirs.into_iter()
        .map(|d| d.join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_skewed_clocks_and_a_short_pause_cause_no_takeover() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let lib = faketime_lib().expect(
        "libfaketime is not installed: scripts/install-tools installs the Debian package faketime",
    );
    // node1's wall clock runs 8 s ahead, node2's 8 s behind; monotonic clocks are untouched.
    let skewed = |offset: &str| {
        vec![
            ("LD_PRELOAD".to_owned(), lib.display().to_string()),
            ("FAKETIME".to_owned(), offset.to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        ]
    };
    let region = Region::start_custom(&[], vec![Vec::new(), skewed("+8s"), skewed("-8s")]).await;
    region.wait_readyz(200, Duration::from_secs(30)).await;

    // The unskewed node reports both skewed clocks.
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = region.node_status(0).await.expect("node0's status");
        let offset = |node: &str| {
            st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["info"]["node"] == node)
                .map(|n| (n["clock_offset_millis"].as_i64(), n["clock_skewed"] == true))
        };
        let near = |o: Option<(Option<i64>, bool)>, want: i64| matches!(o, Some((Some(x), true)) if (x - want).abs() < 1500);
        // node0 logs a warning per skewed node (at its next read of the heartbeats).
        let warned = |n: &str| region.count_logged(&[SKEW_WARNING, n])[0] >= 1;
        if near(offset("node1"), 8000)
            && near(offset("node2"), -8000)
            && st["clock"]["skewed"] == true
            && warned("node=node1")
            && warned("node=node2")
        {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "node0 does not report (or log) the skewed clocks: {st}\n{}",
            region.log_lines(0).join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let max = st["clock"]["max_offset_ms"].as_i64().unwrap();
    assert!((max - 8000).abs() < 1500, "{st}");
    assert_eq!(st["clock"]["allowed_skew_ms"], 500, "{st}");
    let n0 = region.nodes[0].as_ref().unwrap();
    let out = haven_status(n0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SKEW") && text.contains("warning: clocks"),
        "haven status shows the skew:\n{text}"
    );

    // Calls on every node; the node 8 s behind stops for 2 s (less than the heartbeat
    // time-to-live) in the middle of them.
    const SECONDS: u64 = 6;
    let mut calls = calls_on_every_node(&region, 2, SECONDS, "skew").await;
    let paused = region.nodes[2].as_ref().unwrap();
    paused.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    paused.resume();

    finish_counting(&region, &mut calls, SECONDS, IDLE, WITHIN).await;
    assert_no_takeover(&region);
    region.wait_readyz(200, Duration::from_secs(10)).await;
    let st = region.node_status(0).await.unwrap();
    assert!(
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["alive"] == true),
        "every node is alive: {st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_node_stopped_for_less_than_the_time_to_live_keeps_its_calls() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let region = Region::start().await;
    // Calls on every node; node1 stops for 3 s (less than the heartbeat time-to-live, 5 s, but
    // long enough that the others probe its presence) in the middle of them.
    const SECONDS: u64 = 8;
    let mut calls = calls_on_every_node(&region, 2, SECONDS, "stop").await;
    let victim = 1;
    let paused = region.nodes[victim].as_ref().unwrap();
    paused.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    paused.resume();

    finish_counting(&region, &mut calls, SECONDS, IDLE, WITHIN).await;
    assert_no_takeover(&region);
    // Whether the others probed the silent node within the pause depends on how busy the
    // machine is (it is reported, not asserted); what must hold is that none of them found
    // its connection gone, since a stopped process keeps it.
    let victim_field = format!("node=node{victim}");
    let kept = region.count_logged(&[KEPT, &victim_field]);
    eprintln!("probes that found the stopped node's connection open, per node: {kept:?}");
    let gone = region.count_logged(&[GONE]);
    assert!(gone.iter().all(|c| *c == 0), "{GONE}: {gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_during_a_full_nats_outage_writes_get_503_with_retry_after() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut region = Region::start().await;
    let urls: Vec<String> = (0..3).map(|i| region.node_url(i)).collect();
    let sessions: Vec<Legacy> =
        futures::future::join_all(urls.iter().map(|u| Legacy::connect(u))).await;
    for i in 0..3 {
        region.nats.kill9(i);
    }
    region.wait_readyz(503, Duration::from_secs(30)).await;

    let client = reqwest::Client::builder()
        .timeout(HANG_GUARD)
        .build()
        .unwrap();
    for (i, session) in sessions.iter().enumerate() {
        let url = region.node_url(i);
        // Stateless: one JSON body.
        let r = stateless(
            &client,
            &url,
            1,
            "tools/call",
            json!({"name":"notes_put","arguments":{"name":format!("stateless-{i}"),"text":"x"}}),
            json!({}),
        )
        .await;
        check_503(&format!("node{i} stateless notes_put"), r, Some(1)).await;
        // Legacy, a call answered with one JSON body.
        let r = tokio::time::timeout(
            HANG_GUARD,
            session.post_raw(
                json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{
                "name":"notes_put","arguments":{"name":format!("legacy-{i}"),"text":"x"}}}),
            ),
        )
        .await
        .expect("the legacy call is answered");
        check_503(&format!("node{i} legacy notes_put"), r, Some(2)).await;
        // With a progress token, whose answer could become an SSE stream: nothing has been
        // streamed when the write fails, so it is the same 503, in both eras.
        let r = client
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "notes_put")
            .body(
                json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{
                "name":"notes_put","arguments":{"name":format!("progress-{i}"),"text":"x"},
                "_meta":{
                    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientCapabilities": {},
                    "io.modelcontextprotocol/clientInfo": {"name": "haven-test", "version": "1"},
                    "progressToken": "p"
                }}})
                .to_string(),
            )
            .send()
            .await
            .expect("the stateless call with a progress token is answered");
        check_503(
            &format!("node{i} stateless notes_put with progress"),
            r,
            Some(5),
        )
        .await;
        let r = tokio::time::timeout(
            HANG_GUARD,
            session.post_raw(
                json!({"jsonrpc":"2.0","id":6,"method":"tools/call","params":{
                "name":"notes_put","arguments":{"name":format!("legacy-progress-{i}"),"text":"x"},
                "_meta":{"progressToken":"q"}}}),
            ),
        )
        .await
        .expect("the legacy call with a progress token is answered");
        check_503(
            &format!("node{i} legacy notes_put with progress"),
            r,
            Some(6),
        )
        .await;
        // A client of the tasks extension: the task cannot be created (stored).
        let r = stateless(
            &client,
            &url,
            7,
            "tools/call",
            json!({"name":"sleep","arguments":{"seconds":1}}),
            json!({"extensions":{"io.modelcontextprotocol/tasks":{}}}),
        )
        .await;
        check_503(&format!("node{i} stateless sleep as a task"), r, Some(7)).await;
        // Legacy initialize (a session must be stored before it is answered).
        let r = client
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(json!({"jsonrpc":"2.0","id":3,"method":"initialize","params":{"protocolVersion":common::LEGACY,"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}).to_string())
            .send()
            .await
            .expect("initialize is answered");
        check_503(&format!("node{i} initialize"), r, Some(3)).await;
    }

    // NATS comes back: the nodes are ready again and nothing refused was written.
    for i in 0..3 {
        region.nats.restart(i).await;
    }
    region.wait_readyz(200, Duration::from_secs(60)).await;
    for i in 0..3 {
        let r = stateless(
            &client,
            &region.node_url(i),
            4,
            "tools/call",
            json!({"name":"notes_get","arguments":{"name":format!("legacy-{i}")}}),
            json!({}),
        )
        .await;
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["result"]["isError"], true, "not written: {v}");
    }
}

/// Checks a refusal for a store outage: 503, `Retry-After: 1`, the JSON-RPC error marked
/// retryable.
async fn check_503(what: &str, r: reqwest::Response, id: Option<i64>) {
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 503, "{what}: {body}");
    assert_eq!(retry_after.as_deref(), Some("1"), "{what}");
    assert_eq!(body["error"]["data"]["retryable"], true, "{what}: {body}");
    if let Some(id) = id {
        assert_eq!(body["id"], id, "{what}: {body}");
    }
}
