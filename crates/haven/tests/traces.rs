//! Issue 14 §2: traces exported by OTLP/HTTP (protobuf) to a small receiver the test runs.
//! A call carrying `_meta.traceparent` gets a server span with that parent; a federated call
//! (another Haven node as upstream, exporting to the same receiver) shows Haven's client span
//! as the parent of the upstream's server span, in the same trace. Without `_meta` the HTTP
//! `traceparent` header is the parent (both eras); JSON log lines carry the trace id; a
//! request taken over after its node was killed runs under a span linked to its trace. Across
//! two regions: a write is applied in the other region under a `region.apply` span linked to
//! its trace (a root span of its own when the write was in no sampled trace), and a task of a
//! lost region is adopted by the other under a span linked to the task's trace.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::{Haven, Legacy, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::json;

#[derive(Clone, Debug)]
struct Received {
    service_instance: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: Vec<(String, String)>,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
}

/// An OTLP/HTTP receiver on loopback, keeping every span; it stops with the test's runtime.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return axum::http::StatusCode::BAD_REQUEST;
                };
                for rs in req.resource_spans {
                    let instance = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.instance.id")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            kept.lock().unwrap().push(Received {
                                service_instance: instance.clone(),
                                name: s.name.clone(),
                                kind: s.kind,
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attributes: s
                                    .attributes
                                    .iter()
                                    .map(|a| {
                                        (
                                            a.key.clone(),
                                            format!("{:?}", a.value.as_ref().map(|v| &v.value)),
                                        )
                                    })
                                    .collect(),
                                links: s
                                    .links
                                    .iter()
                                    .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                                    .collect(),
                            });
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, spans)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_is_the_parent_and_the_trace_goes_on_to_the_upstream() {
    let (collector, spans) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let up = Haven::start(
        &dir.path().join("up"),
        free_port(),
        "default",
        &["--otlp-endpoint", &collector, "--node-id", "upstream-node"],
    )
    .await;
    let data = dir.path().join("data");
    let h = Haven::start(
        &data,
        free_port(),
        "default",
        &["--otlp-endpoint", &collector, "--node-id", "front-node"],
    )
    .await;
    common::run_ok(
        std::process::Command::new(common::haven_bin())
            .args(["registry", "add", "up", "--url", &up.url(), "--data"])
            .arg(&data),
    );
    let client = reqwest::Client::new();
    let served = haven_testkit::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let v = common::stateless_with_meta(
                &client,
                &h.url(),
                1,
                "tools/list",
                json!({}),
                json!({}),
            )
            .await;
            v.to_string().contains("up__echo")
        },
    )
    .await;
    assert!(served, "up__echo never listed");

    let trace = "5b8aa5a2d2c872e8321cf37308d69df2";
    let parent = "051581bf3cb55c13";
    let v = common::stateless_with_meta(
        &client,
        &h.url(),
        2,
        "tools/call",
        json!({"name": "up__echo", "arguments": {"text": "traced"}}),
        json!({"traceparent": format!("00-{trace}-{parent}-01")}),
    )
    .await;
    assert_eq!(v["result"]["content"][0]["text"], "traced", "{v}");

    // The batch exporters send within seconds; wait (bounded) for the three spans.
    let find = |name: &str, instance: &str| {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.trace_id == trace && s.name == name && s.service_instance.contains(instance)
            })
            .cloned()
    };
    let complete = haven_testkit::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            find("tools/call up__echo", "front-node").is_some()
                && find("tools/call up", "front-node").is_some()
                && find("tools/call echo", "upstream-node").is_some()
        },
    )
    .await;
    let all: Vec<(String, String, String)> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s.service_instance.clone(),
                s.name.clone(),
                s.trace_id.clone(),
            )
        })
        .collect();
    assert!(
        complete,
        "spans of trace {trace} missing; received: {all:?}"
    );
    let server = find("tools/call up__echo", "front-node").unwrap();
    let client_span = find("tools/call up", "front-node").unwrap();
    let upstream = find("tools/call echo", "upstream-node").unwrap();
    // SPAN_KIND_SERVER = 2, SPAN_KIND_CLIENT = 3.
    assert_eq!(server.kind, 2, "{server:?}");
    assert_eq!(
        server.parent, parent,
        "the client's traceparent is the parent"
    );
    assert!(
        server
            .attributes
            .iter()
            .any(|(k, v)| k == "mcp.method.name" && v.contains("tools/call")),
        "{server:?}"
    );
    assert_eq!(client_span.kind, 3, "{client_span:?}");
    assert_eq!(client_span.parent, server.span_id);
    assert_eq!(upstream.kind, 2, "{upstream:?}");
    assert_eq!(
        upstream.parent, client_span.span_id,
        "the upstream's span is a child of Haven's client span"
    );
}

/// A stateless `tools/call` of `echo` with `_meta` holding `extra`, and `headers`.
async fn stateless_echo(url: &str, id: i64, extra: serde_json::Value, headers: &[(&str, &str)]) {
    let mut meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        meta[k] = v;
    }
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "hi"}, "_meta": meta}});
    let v: serde_json::Value = req
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_traceparent_header_is_the_parent_unless_meta_names_one_and_json_logs_carry_the_ids()
 {
    let (collector, spans) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(
        &dir.path().join("data"),
        free_port(),
        "default",
        &[
            "--otlp-endpoint",
            &collector,
            "--node-id",
            "header-node",
            "--log-format",
            "json",
            "--log-level",
            "info,haven_mcp=debug",
        ],
    )
    .await;
    let (legacy_trace, legacy_parent) = ("11111111111111111111111111111111", "1111111111111111");
    let (stateless_trace, stateless_parent) =
        ("22222222222222222222222222222222", "2222222222222222");
    let (meta_trace, meta_parent) = ("33333333333333333333333333333333", "3333333333333333");
    let header_trace = "44444444444444444444444444444444";
    let tp = |t: &str, p: &str| format!("00-{t}-{p}-01");

    // Legacy era: the header on a session's request.
    let l = Legacy::connect(&h.url()).await;
    let r = l
        .client
        .post(&l.url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &l.session)
        .header("mcp-protocol-version", common::LEGACY)
        .header("traceparent", tp(legacy_trace, legacy_parent))
        .header("tracestate", "vendor=1")
        .body(
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "hi"}}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let v = common::final_response(r, 7).await;
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");
    // Stateless era: the header alone, then `_meta` and a header of another trace.
    let header = tp(stateless_trace, stateless_parent);
    stateless_echo(&h.url(), 8, json!({}), &[("traceparent", &header)]).await;
    let other = tp(header_trace, "4444444444444444");
    stateless_echo(
        &h.url(),
        9,
        json!({"traceparent": tp(meta_trace, meta_parent)}),
        &[("traceparent", &other)],
    )
    .await;

    let find = |trace: &str| {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.trace_id == trace && s.kind == 2)
            .cloned()
    };
    let complete = haven_testkit::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            find(legacy_trace).is_some()
                && find(stateless_trace).is_some()
                && find(meta_trace).is_some()
        },
    )
    .await;
    assert!(
        complete,
        "server spans missing: {:?}",
        spans.lock().unwrap()
    );
    assert_eq!(find(legacy_trace).unwrap().parent, legacy_parent);
    assert_eq!(find(stateless_trace).unwrap().parent, stateless_parent);
    assert_eq!(
        find(meta_trace).unwrap().parent,
        meta_parent,
        "_meta wins over the header"
    );
    assert!(
        !spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.trace_id == header_trace),
        "no span in the header's trace when _meta names one"
    );

    // The JSON log line of the stateless request carries the trace and span ids that the
    // receiver got.
    let server = find(stateless_trace).unwrap();
    let log = std::fs::read_to_string(&h.log).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["trace_id"] == stateless_trace)
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["span_id"] == server.span_id.as_str() && v["fields"]["message"] == "request"),
        "no log line with the request's ids in:\n{log}"
    );
    assert!(
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v.get("trace_id").is_none()),
        "lines outside a request carry no trace id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_a_task_taken_over_after_a_kill_9_run_under_spans_linked_to_their_traces() {
    let _one = common::cluster::ONE_REGION_AT_A_TIME.lock().await;
    let (collector, spans) = receiver().await;
    let mut region = common::cluster::Region::start_with(&["--otlp-endpoint", &collector]).await;
    let (trace, parent) = ("55555555555555555555555555555555", "5555555555555555");
    let client = Legacy::connect(&region.node_url(0)).await;
    let r = client
        .post_raw(
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "sleep", "arguments": {"seconds": 8},
            "_meta": {"progressToken": "p", "traceparent": format!("00-{trace}-{parent}-01")}}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    // Once progress arrives, the call's stream (and its in-flight record) exists.
    let mut sse = haven_testkit::SseReader::new(r);
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), sse.next())
            .await
            .expect("the call's events arrive")
            .expect("the stream stays open");
        if e.data.contains("notifications/progress") {
            break;
        }
    }
    // And a task there, in another trace.
    let task_trace = "77777777777777777777777777777777";
    let created = common::stateless_with_meta(
        &reqwest::Client::new(),
        &region.node_url(0),
        4,
        "tools/call",
        json!({"name": "sleep", "arguments": {"seconds": 8}}),
        json!({
            "io.modelcontextprotocol/clientCapabilities":
                {"extensions": {"io.modelcontextprotocol/tasks": {}}},
            "traceparent": format!("00-{task_trace}-7777777777777777-01"),
        }),
    )
    .await;
    assert_eq!(created["result"]["resultType"], "task", "{created}");
    region.kill9(0);
    drop(sse);

    let takeover = || {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == "takeover tools/call" && s.links.iter().any(|(t, _)| t == trace))
            .cloned()
    };
    let seen = haven_testkit::wait_until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async { takeover().is_some() },
    )
    .await;
    let names: Vec<String> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| format!("{} {} {:?}", s.service_instance, s.name, s.links))
        .collect();
    assert!(seen, "no takeover span linked to {trace}: {names:?}");
    let span = takeover().unwrap();
    assert!(
        !span.service_instance.contains("node0"),
        "a surviving node took it over: {span:?}"
    );
    assert_ne!(span.trace_id, trace, "the takeover is a trace of its own");
    let (_, linked) = span.links.iter().find(|(t, _)| t == trace).unwrap();
    assert_ne!(
        linked, parent,
        "the link names Haven's server span of the first run, not the client's"
    );
    // The idempotent call runs again under the takeover span.
    let rerun = haven_testkit::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            spans
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.name == "tools/call sleep" && s.parent == span.span_id)
        },
    )
    .await;
    assert!(
        rerun,
        "the re-run's server span is a child of the takeover span"
    );
    // The task is adopted by a surviving node under a span linked to its trace.
    let adopted = haven_testkit::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            spans.lock().unwrap().iter().any(|s| {
                s.name == "takeover task"
                    && !s.service_instance.contains("node0")
                    && s.links.iter().any(|(t, _)| t == task_trace)
            })
        },
    )
    .await;
    assert!(
        adopted,
        "no takeover span of the task linked to {task_trace}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_replicated_to_another_region_is_applied_under_a_span_linked_to_its_trace() {
    let _one = common::cluster::ONE_REGION_AT_A_TIME.lock().await;
    let (collector, spans) = receiver().await;
    // A samples no new trace (only those its callers sampled); B samples every one.
    let r = two_regions(&collector, "0", "1").await;
    let a = &r.a;

    let (trace, parent) = ("66666666666666666666666666666666", "6666666666666666");
    let s = Legacy::connect(&a.url()).await;
    let v = s
        .request(
            1,
            "tools/call",
            json!({"name": "notes_put", "arguments": {"name": "traced", "text": "x"},
                "_meta": {"traceparent": format!("00-{trace}-{parent}-01")}}),
        )
        .await;
    assert_eq!(v["result"]["isError"], json!(false), "{v}");

    let applied = || {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.name == "region.apply"
                    && s.service_instance.contains("B-node")
                    && s.links.iter().any(|(t, _)| t == trace)
            })
            .cloned()
    };
    let seen = haven_testkit::wait_until(
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async { applied().is_some() },
    )
    .await;
    let names: Vec<String> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| format!("{} {} {:?}", s.service_instance, s.name, s.links))
        .collect();
    assert!(
        seen,
        "no region.apply span in B linked to {trace}: {names:?}"
    );
    let span = applied().unwrap();
    assert_ne!(span.trace_id, trace, "applying is a trace of B's own");
    // The link names A's span of the write (its store commit), not the client's span.
    let (_, linked) = span.links.iter().find(|(t, _)| t == trace).unwrap();
    let commit = spans
        .lock()
        .unwrap()
        .iter()
        .find(|s| {
            s.trace_id == trace && &s.span_id == linked && s.service_instance.contains("A-node")
        })
        .cloned()
        .expect("the linked span is one A exported in the writer's trace");
    // SPAN_KIND_INTERNAL = 1: the commit's span, a child of the request's server span.
    assert_eq!(
        (commit.name.as_str(), commit.kind),
        ("store.commit", 1),
        "{commit:?}"
    );
    let request = spans
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.trace_id == trace && s.span_id == commit.parent)
        .cloned();
    assert!(
        request
            .as_ref()
            .is_some_and(|r| r.name == "tools/call notes_put"
                && r.kind == 2
                && r.attributes
                    .iter()
                    .any(|(k, v)| k == "gen_ai.tool.name" && v.contains("notes_put"))
                && r.attributes.iter().any(|(k, _)| k == "mcp.session.id")),
        "the commit's parent is the request's span, with its tool and session: {request:?}"
    );

    // A write in no sampled trace carries no trace context to B, which still applies it under
    // a region.apply span: a root of its own (sampled at B's ratio), with no link.
    let v = s
        .request(
            2,
            "tools/call",
            json!({"name": "notes_put", "arguments": {"name": "untraced", "text": "y"}}),
        )
        .await;
    assert_eq!(v["result"]["isError"], json!(false), "{v}");
    let unlinked = haven_testkit::wait_until(
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async {
            spans.lock().unwrap().iter().any(|s| {
                s.name == "region.apply"
                    && s.service_instance.contains("B-node")
                    && s.links.is_empty()
                    && s.parent.is_empty()
            })
        },
    )
    .await;
    assert!(
        unlinked,
        "no region.apply span in B for a batch without a trace context"
    );
    drop(s);
}

/// Two regions exporting spans to `collector`, A and B: each a nats-server in its own
/// JetStream domain and one node (`A-node`, `B-node`, sampling new traces at `ratio_a` and
/// `ratio_b`) applying the other region's log; B's server joins A's by a leafnode.
struct TwoRegions {
    // Fields drop in order: the nodes first, NATS last.
    a: Haven,
    b: Haven,
    _nats_b: haven_testkit::NatsCluster,
    _link: haven_testkit::Link,
    nats_a: haven_testkit::NatsCluster,
    _dirs: tempfile::TempDir,
}

async fn two_regions(collector: &str, ratio_a: &str, ratio_b: &str) -> TwoRegions {
    let nats_a = haven_testkit::NatsCluster::start_region("A", &[]).await;
    let link = haven_testkit::Link::start(nats_a.leaf_port.unwrap()).await;
    let nats_b = haven_testkit::NatsCluster::start_region("B", &[link.port]).await;
    let dirs = tempfile::tempdir().unwrap();
    let node = |nats: &haven_testkit::NatsCluster, region: &str, peer: &str, ratio: &str| {
        let store = nats.url(0);
        let data = dirs.path().join(region);
        let node_id = format!("{region}-node");
        let args: Vec<String> = [
            "--store",
            &store,
            "--store-replicas",
            "1",
            "--region",
            region,
            "--peer-regions",
            peer,
            "--node-id",
            &node_id,
            "--region-check-interval",
            "1s",
            "--otlp-endpoint",
            collector,
            "--trace-sample-ratio",
            ratio,
        ]
        .map(str::to_owned)
        .into();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Haven::start(&data, free_port(), "default", &args).await
        }
    };
    let a = node(&nats_a, "A", "B", ratio_a).await;
    let b = node(&nats_b, "B", "A", ratio_b).await;
    TwoRegions {
        a,
        b,
        _nats_b: nats_b,
        _link: link,
        nats_a,
        _dirs: dirs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_adopted_by_another_region_runs_under_a_span_linked_to_its_trace() {
    let _one = common::cluster::ONE_REGION_AT_A_TIME.lock().await;
    let (collector, spans) = receiver().await;
    let mut r = two_regions(&collector, "1", "1").await;
    // A task in region A, in the caller's trace; long enough to outlive A.
    let (task_trace, parent) = ("88888888888888888888888888888888", "8888888888888888");
    let created = common::stateless_with_meta(
        &reqwest::Client::new(),
        &r.a.url(),
        1,
        "tools/call",
        json!({"name": "sleep", "arguments": {"seconds": 15}}),
        json!({
            "io.modelcontextprotocol/clientCapabilities":
                {"extensions": {"io.modelcontextprotocol/tasks": {}}},
            "traceparent": format!("00-{task_trace}-{parent}-01"),
        }),
    )
    .await;
    assert_eq!(created["result"]["resultType"], "task", "{created}");
    let task_id = created["result"]["taskId"].as_str().unwrap().to_owned();
    // Before A goes: B serves the task (its record, and the record of who runs it, written
    // with it, have replicated). A's server span of the call stays open while the task runs:
    // it is never exported, as A is killed first.
    let http = reqwest::Client::new();
    let mut poll = 1;
    let replicated =
        haven_testkit::wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            poll += 1;
            let (http, url, id, task) = (&http, r.b.url(), poll, task_id.clone());
            async move {
                let caps = json!({"extensions": {"io.modelcontextprotocol/tasks": {}}});
                let v: serde_json::Value =
                    common::stateless(http, &url, id, "tasks/get", json!({"taskId": task}), caps)
                        .await
                        .json()
                        .await
                        .unwrap();
                v["result"]["status"] == "working"
            }
        })
        .await;
    assert!(replicated, "B never served region A's task");

    // Region A is lost; B's operator takes over its work.
    r.a.kill9();
    r.nats_a.kill9(0);
    let silent = haven_testkit::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async { r.b.admin_get("/admin/v1/regions").await["unreachable"] == json!(["A"]) },
    )
    .await;
    assert!(silent, "B never saw region A unreachable");
    let out = std::process::Command::new(common::haven_bin())
        .args(["region", "takeover", "A", "--confirm-dead", "--node"])
        .arg(format!("http://127.0.0.1:{}", r.b.port))
        .arg("--data")
        .arg(&r.b.data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // B adopts the task under a span of its own trace, linked to A's server span of the call.
    let adoption = || {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.name == "takeover task"
                    && s.service_instance.contains("B-node")
                    && s.links.iter().any(|(t, _)| t == task_trace)
            })
            .cloned()
    };
    let adopted = haven_testkit::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async { adoption().is_some() },
    )
    .await;
    let names: Vec<String> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| format!("{} {} {:?}", s.service_instance, s.name, s.links))
        .collect();
    assert!(
        adopted,
        "no takeover span of the task in B linked to {task_trace}: {names:?}"
    );
    let span = adoption().unwrap();
    assert_ne!(
        span.trace_id, task_trace,
        "the adoption is a trace of B's own"
    );
    let (_, linked) = span.links.iter().find(|(t, _)| t == task_trace).unwrap();
    assert_ne!(
        linked, parent,
        "the link names Haven's server span of the call in A, not the client's"
    );
    drop(r);
}
