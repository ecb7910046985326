//! Issue 14 §1: a real Prometheus (Debian's `prometheus`) scrapes a 3-node region's
//! `/metrics` (with each node's admin token, as an operator would configure it) and its HTTP
//! API answers for the metrics Haven promises, after traffic in both eras, a backup and the
//! kill of a node. Also: the two encodings, credentials, `--metrics-listen`, and no backup
//! series on a node without backup.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::cluster::{ONE_REGION_AT_A_TIME, Region};
use common::prometheus::Prometheus;
use common::{Haven, Legacy, free_port};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_region_and_sees_traffic_a_backup_and_a_kill() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("backup.key");
    common::write_key_file(&key, format!("{}\n", "cd".repeat(32)));
    let backup = keys.path().join("backup");
    let mut region = Region::start_with(&[
        "--backup-url",
        backup.to_str().unwrap(),
        "--backup-key-file",
        key.to_str().unwrap(),
        "--backup-interval",
        "1s",
    ])
    .await;
    let targets: Vec<(String, PathBuf)> = region
        .nodes
        .iter()
        .flatten()
        .map(|n| (format!("127.0.0.1:{}", n.port), n.data.join("admin.token")))
        .collect();
    let prom = Prometheus::start(&targets).await;

    // Traffic in both eras, with a trace context on one call.
    let l = Legacy::connect(&region.node_url(0)).await;
    for i in 0..5 {
        let v = l
            .call_tool(
                i,
                "notes_put",
                json!({"name": format!("m-{i}"), "text": "x"}),
            )
            .await;
        assert_eq!(v["result"]["isError"], json!(false), "{v}");
    }
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let v: Value = common::stateless(
        &reqwest::Client::new(),
        &region.node_url(1),
        1,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "traced"}}),
        json!({}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "traced", "{v}");
    let v = common::stateless_with_meta(
        &reqwest::Client::new(),
        &region.node_url(1),
        2,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "traced"}}),
        json!({"traceparent": format!("00-{trace}-b7ad6b7169203331-01")}),
    )
    .await;
    assert_eq!(v["result"]["content"][0]["text"], "traced", "{v}");
    let missing = l.call_tool(9, "no_such_tool", json!({})).await;
    assert!(missing["error"].is_object(), "{missing}");

    // Every node is scraped, with its region and node labels.
    prom.until("up{service=\"haven\"}", 3, |v| v == 1.0).await;
    prom.until("haven_build_info", 3, |v| v == 1.0).await;
    // No drill on record yet: 0, which the alert rules read as "never".
    prom.until("haven_drill_last_success_timestamp_seconds", 3, |v| {
        v == 0.0
    })
    .await;
    // Requests by method, tool, era and outcome.
    prom.until(
        "sum by (node) (mcp_server_operation_duration_seconds_count{mcp_method_name=\"tools/call\",gen_ai_tool_name=\"notes_put\",era=\"legacy\",outcome=\"ok\"})",
        1,
        |v| v >= 5.0,
    )
    .await;
    prom.until(
        "mcp_server_operation_duration_seconds_count{gen_ai_tool_name=\"echo\",era=\"stateless\",mcp_protocol_version=\"2026-07-28\"}",
        1,
        |v| v >= 2.0,
    )
    .await;
    // An unknown tool's name is not a label value.
    prom.until(
        "mcp_server_operation_duration_seconds_count{gen_ai_tool_name=\"_other\",outcome=\"error\",rpc_response_status_code=\"-32602\"}",
        1,
        |v| v >= 1.0,
    )
    .await;
    assert!(
        prom.query(
            "mcp_server_operation_duration_seconds_count{gen_ai_tool_name=\"no_such_tool\"}"
        )
        .await
        .is_empty()
    );
    // The trace id as an exemplar of the duration.
    let found = haven_testkit::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let v: Value = reqwest::Client::new()
                .get(format!("{}/api/v1/query_exemplars", prom.url))
                .query(&[
                    ("query", "mcp_server_operation_duration_seconds_bucket"),
                    ("start", "0"),
                    ("end", "9999999999"),
                ])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v.to_string().contains(trace)
        },
    )
    .await;
    assert!(found, "the trace id never showed as an exemplar");
    // Sessions, store, NATS, the stream's quorum, process metrics.
    prom.until("sum(haven_sessions_open)", 1, |v| v >= 1.0)
        .await;
    prom.until("haven_store_commit_duration_seconds_count", 3, |v| v >= 1.0)
        .await;
    prom.until("haven_nats_connected", 3, |v| v == 1.0).await;
    prom.until("haven_stream_has_quorum", 3, |v| v == 1.0).await;
    prom.until("haven_store_writable", 3, |v| v == 1.0).await;
    prom.until("process_resident_memory_bytes", 3, |v| v > 1e6)
        .await;
    prom.until("process_open_fds / process_max_fds", 3, |v| {
        v > 0.0 && v < 1.0
    })
    .await;
    // The limits the resource alerts compare use with (cgroup v2, else the machine's).
    prom.until(
        "process_resident_memory_bytes / haven_memory_limit_bytes",
        3,
        |v| v > 0.0 && v < 1.0,
    )
    .await;
    prom.until("haven_cpu_limit_cores", 3, |v| v > 0.0).await;
    // The backup: one node ships, and its last segment is recent.
    prom.until(
        "time() - max(haven_backup_last_success_timestamp_seconds{kind=\"segment\"})",
        1,
        |v| v < 60.0,
    )
    .await;
    // The backup lag: from the node that ships only (the other two are in standby and know
    // no shipped position, so they show none).
    prom.until("haven_backup_lag_entries", 1, |v| v >= 0.0)
        .await;
    prom.until("haven_draining", 3, |v| v == 0.0).await;
    // Every node's delay probe runs (the delay itself depends on the machine's load).
    prom.until("haven_scheduling_delay_seconds", 3, |v| v >= 0.0)
        .await;

    // A killed node is down within seconds.
    region.kill9(2);
    prom.until("sum(up{service=\"haven\"})", 1, |v| v == 2.0)
        .await;
    drop(prom);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_credentials_on_the_admin_api_and_none_on_their_own_listener() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let h = Haven::start(
        &dir.path().join("data"),
        free_port(),
        "default",
        &["--metrics-listen", &listen],
    )
    .await;
    let admin = format!("http://127.0.0.1:{}/metrics", h.port);
    let r = reqwest::get(&admin).await.unwrap();
    assert_eq!(r.status(), 401);
    let token = std::fs::read_to_string(h.data.join("admin.token")).unwrap();
    let r = reqwest::Client::new()
        .get(&admin)
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text().await.unwrap();
    assert!(
        text.contains("haven_build_info{") && !text.contains("# EOF"),
        "{text}"
    );
    // No backup on this node: no backup series at all (a lag of 0 would say "all shipped").
    assert!(!text.contains("haven_backup"), "{text}");
    // Tasks by state: one that ran to its end shows as completed.
    let created: Value = common::stateless(
        &reqwest::Client::new(),
        &h.url(),
        1,
        "tools/call",
        json!({"name": "sleep", "arguments": {"seconds": 1}}),
        json!({"extensions": {"io.modelcontextprotocol/tasks": {}}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(created["result"]["resultType"], "task", "{created}");
    let completed = haven_testkit::wait_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(100),
        || async {
            let text = reqwest::get(format!("http://{listen}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            text.lines().any(|l| {
                l.starts_with("haven_tasks{")
                    && l.contains("state=\"completed\"")
                    && l.ends_with(" 1")
            }) && text.lines().any(|l| {
                l.starts_with("haven_tasks{")
                    && l.contains("state=\"working\"")
                    && l.ends_with(" 0")
            })
        },
    )
    .await;
    assert!(completed, "haven_tasks never showed the completed task");
    // Open on its own listener; OpenMetrics when asked.
    let r = reqwest::Client::new()
        .get(format!("http://{listen}/metrics"))
        .header("accept", "application/openmetrics-text;version=1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(r.text().await.unwrap().ends_with("# EOF\n"));
    // Nothing else is served there.
    let r = reqwest::get(format!("http://{listen}/admin/v1/status"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
