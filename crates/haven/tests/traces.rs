//! Issue 14 §2: traces exported by OTLP/HTTP (protobuf) to a small receiver the test runs.
//! A call carrying `_meta.traceparent` gets a server span with that parent; a federated call
//! (another Haven node as upstream, exporting to the same receiver) shows Haven's client span
//! as the parent of the upstream's server span, in the same trace.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::{Haven, free_port};
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
