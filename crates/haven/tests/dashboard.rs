//! Issue 14 §4: the Grafana dashboard `deploy/grafana/haven-dashboard.json`. It is valid
//! Grafana JSON (panels placed on the grid without overlaps, unique ids, every query with a
//! `refId` and the Prometheus data source variable, the `job` and `region` variables), and
//! every one of its queries returns data from a real Prometheus (Debian's) scraping a real
//! deployment of two regions, `eu` and `us`: each one nats-server running JetStream in its own
//! domain and one Haven node applying the other region's log; `eu` ships backups to a local
//! directory; both serve a federated upstream (server-everything over HTTP). The same run
//! shows Prometheus the replication lag of each region behind the other, and that it is back
//! to small values after writes on both sides.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::ONE_REGION_AT_A_TIME;
use common::prometheus::{Prometheus, value_of};
use common::upstreams::{Upstream, admin, cli_ok, require_tools};
use common::{Haven, Legacy, free_port};
use haven_testkit::{NatsCluster, wait_until};
use serde_json::{Value, json};

fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/haven-dashboard.json")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(dashboard_path()).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// One query of the dashboard: the panel it belongs to, its `refId` and its expression.
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
}

/// Every panel of the dashboard, rows' nested panels included.
fn all_panels(d: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p.clone());
        for inner in p["panels"].as_array().into_iter().flatten() {
            out.push(inner.clone());
        }
    }
    out
}

fn queries(d: &Value) -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(PanelQuery {
                panel: p["title"].as_str().unwrap_or_default().to_owned(),
                ref_id: t["refId"].as_str().unwrap_or_default().to_owned(),
                expr: t["expr"].as_str().unwrap_or_default().to_owned(),
            });
        }
    }
    out
}

/// `expr` with Grafana's variables replaced as Grafana would for these choices: job `haven`,
/// both regions selected (a multi-value variable becomes a regex alternation), and a rate
/// interval of 5 minutes (a wide window, so that the traffic of the test stays in it however
/// slow the machine; Grafana picks at least four scrape intervals).
fn substitute(expr: &str, regions: &[&str]) -> String {
    let region = format!("({})", regions.join("|"));
    let vars = [
        ("__rate_interval", "5m".to_owned()),
        ("__interval", "15s".to_owned()),
        ("__range", "1h".to_owned()),
        ("region", region),
        ("job", "haven".to_owned()),
    ];
    let mut out = expr.to_owned();
    for (name, value) in &vars {
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    assert!(
        !out.contains('$'),
        "a variable of `{expr}` is not one the dashboard defines: {out}"
    );
    out
}

#[test]
fn the_dashboard_is_valid_grafana_json() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39, "schemaVersion");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    // The variables: a Prometheus data source, the job, and the regions (multi, with All).
    let vars: BTreeMap<String, Value> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    assert_eq!(vars["job"]["type"], "query");
    assert_eq!(
        vars["job"]["query"]["query"],
        "label_values(haven_build_info, job)"
    );
    let region = &vars["region"];
    assert_eq!(region["type"], "query");
    assert_eq!(
        region["query"]["query"],
        "label_values(haven_build_info, region)"
    );
    assert_eq!(region["definition"], region["query"]["query"]);
    assert_eq!(region["multi"], true);
    assert_eq!(region["includeAll"], true);
    for v in [&vars["job"], region] {
        assert_eq!(v["datasource"]["uid"], "${datasource}");
        assert_eq!(v["datasource"]["type"], "prometheus");
    }

    // Panels: unique ids, on the 24-column grid, no two overlapping; queries with refIds.
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut rows = 0;
    for p in all_panels(&d) {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(!title.is_empty());
        let id = p["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} ({title}) is used twice");
        let g = &p["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(h > 0 && w > 0 && x + w <= 24, "{title}: {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_owned()) {
                    panic!("panels {other} and {title} overlap at ({cx}, {cy})");
                }
            }
        }
        if p["type"] == "row" {
            rows += 1;
            assert_eq!((w, h, x), (24, 1, 0), "{title}");
            continue;
        }
        assert!(
            [
                "timeseries",
                "stat",
                "state-timeline",
                "table",
                "gauge",
                "bargauge"
            ]
            .contains(&p["type"].as_str().unwrap()),
            "{title}: panel type {}",
            p["type"]
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}: a description says what the panel shows"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            let r = t["refId"].as_str().expect("refId");
            assert!(refs.insert(r), "{title}: refId {r} twice");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains("region=~\"$region\""),
                "{title}: `{expr}` ignores the region variable"
            );
            assert!(
                expr.contains("job=\"$job\""),
                "{title}: `{expr}` ignores the job variable"
            );
            // Rates over Grafana's rate interval: no fixed window anywhere.
            for (i, _) in expr.match_indices('[') {
                assert!(
                    expr[i..].starts_with("[$__rate_interval]"),
                    "{title}: `{expr}` has a window other than $__rate_interval"
                );
            }
        }
    }
    assert!(rows >= 8, "rows per topic");
}

/// A region of its own: one nats-server (JetStream domain = the region's name) and one Haven
/// node that applies the other region's log and serves `/metrics` without credentials on an
/// address of its own.
async fn region_node(
    nats: &NatsCluster,
    dirs: &Path,
    region: &str,
    peer: &str,
    metrics: &str,
    extra: &[&str],
) -> Haven {
    let store = nats.url(0);
    let node_id = format!("{region}-1");
    let mut args = vec![
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
        "--metrics-listen",
        metrics,
    ];
    args.extend_from_slice(extra);
    Haven::start(&dirs.join(region), free_port(), "default", &args).await
}

/// The deployment; fields drop in order: the nodes, then the upstream, then NATS.
struct TwoRegions {
    eu: Haven,
    us: Haven,
    eu_metrics: String,
    us_metrics: String,
    _upstream: Upstream,
    _nats_us: NatsCluster,
    _nats_eu: NatsCluster,
    _dirs: tempfile::TempDir,
}

impl Drop for TwoRegions {
    /// A failed test keeps the nodes' data directories and logs, and says where.
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(fresh) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self._dirs, fresh).keep();
            eprintln!("the regions' data and logs are kept in {}", kept.display());
        }
    }
}

async fn two_regions() -> TwoRegions {
    require_tools();
    let dirs = tempfile::tempdir().unwrap();
    let key = dirs.path().join("backup.key");
    common::write_key_file(&key, format!("{}\n", "ab".repeat(32)));
    let backup = dirs.path().join("backup");
    let nats_eu = NatsCluster::start_region("eu", &[]).await;
    let nats_us = NatsCluster::start_region("us", &[nats_eu.leaf_port.unwrap()]).await;
    let eu_metrics = format!("127.0.0.1:{}", free_port());
    let us_metrics = format!("127.0.0.1:{}", free_port());
    let eu = region_node(
        &nats_eu,
        dirs.path(),
        "eu",
        "us",
        &eu_metrics,
        &[
            "--backup-url",
            backup.to_str().unwrap(),
            "--backup-key-file",
            key.to_str().unwrap(),
            "--backup-interval",
            "1s",
        ],
    )
    .await;
    let us = region_node(&nats_us, dirs.path(), "us", "eu", &us_metrics, &[]).await;
    // A federated upstream, registered in eu and served by both regions.
    let upstream = Upstream::everything_http(None).await;
    cli_ok(
        &eu,
        &["registry", "add", "ev", "--url", &upstream.url()],
        None,
    );
    // eu takes the active role; us is standby.
    cli_ok(&eu, &["region", "promote"], None);
    TwoRegions {
        eu,
        us,
        eu_metrics,
        us_metrics,
        _upstream: upstream,
        _nats_us: nats_us,
        _nats_eu: nats_eu,
        _dirs: dirs,
    }
}

/// Whether an answer is a JSON-RPC error with `code`.
fn is_error(v: &Value, code: i64) -> bool {
    v["error"]["code"] == json!(code)
}

/// Traffic of both eras against node `h` of `region`: tools (built-in and federated),
/// resources and prompts, and errors the client caused; `round` names the note it writes.
async fn drive(h: &Haven, region: &str, round: u32) {
    let note = format!("{region}-note-{round}");
    // The session era.
    let l = Legacy::connect(&h.url()).await;
    let v = l
        .call_tool(1, "notes_put", json!({"name": note, "text": "dashboard"}))
        .await;
    assert_eq!(v["result"]["isError"], json!(false), "{v}");
    let v = l.call_tool(2, "echo", json!({"text": "hi"})).await;
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");
    let v = l
        .request(
            3,
            "resources/read",
            json!({"uri": format!("note://{note}")}),
        )
        .await;
    assert_eq!(v["result"]["contents"][0]["text"], "dashboard", "{v}");
    let v = l.request(4, "resources/list", json!({})).await;
    assert!(v["result"]["resources"].is_array(), "{v}");
    let v = l
        .request(
            5,
            "prompts/get",
            json!({"name": "discuss_note", "arguments": {"name": note}}),
        )
        .await;
    assert!(v["result"]["messages"].is_array(), "{v}");
    let v = l.request(6, "prompts/list", json!({})).await;
    assert!(v["result"]["prompts"].is_array(), "{v}");
    // The upstream's tool (the session may reach the node before the upstream is connected:
    // bounded retries).
    let mut id = 100;
    let federated = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
        id += 1;
        let (l, id) = (&l, id);
        async move {
            let v = l.call_tool(id, "ev__echo", json!({"message": "up"})).await;
            v["result"]["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.contains("up"))
        }
    })
    .await;
    assert!(federated, "ev__echo never answered in {region}");
    // Errors: an unknown tool, an unknown method, a missing resource.
    let v = l.call_tool(7, "no_such_tool", json!({})).await;
    assert!(is_error(&v, -32602), "{v}");
    let v = l.request(8, "no/such_method", json!({})).await;
    assert!(is_error(&v, -32601), "{v}");
    let v = l
        .request(9, "resources/read", json!({"uri": "note://never-written"}))
        .await;
    assert!(is_error(&v, -32002), "{v}");

    // The stateless era.
    let http = reqwest::Client::new();
    let call = |id: i64, method: &'static str, params: Value| {
        let (http, url) = (http.clone(), h.url());
        async move {
            common::stateless(&http, &url, id, method, params, json!({}))
                .await
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let v = call(
        11,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "s"}}),
    )
    .await;
    assert_eq!(v["result"]["content"][0]["text"], "s", "{v}");
    let v = call(
        12,
        "resources/read",
        json!({"uri": format!("note://{note}")}),
    )
    .await;
    assert_eq!(v["result"]["contents"][0]["text"], "dashboard", "{v}");
    let v = call(
        13,
        "prompts/get",
        json!({"name": "discuss_note", "arguments": {"name": note}}),
    )
    .await;
    assert!(v["result"]["messages"].is_array(), "{v}");
    let v = call(
        14,
        "tools/call",
        json!({"name": "ev__echo", "arguments": {"message": "s"}}),
    )
    .await;
    assert!(v["result"]["content"].is_array(), "{v}");
    let v = call(15, "tools/call", json!({"name": "nope", "arguments": {}})).await;
    assert!(is_error(&v, -32602), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_two_regions() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let d = dashboard();
    let r = two_regions().await;
    // Scraped as README's "Operating Haven" says: one job `haven`, Haven's own `region` and
    // `node` labels kept, and the same two as target labels (for `up`).
    let prom = Prometheus::start_with(&format!(
        "  - job_name: haven\n    honor_labels: true\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{}']\n        labels: {{ region: eu, node: eu-1 }}\n      - targets: ['{}']\n        labels: {{ region: us, node: us-1 }}\n",
        r.eu_metrics, r.us_metrics
    ))
    .await;
    prom.until("up{job=\"haven\"}", 2, |v| v == 1.0).await;

    // Round 1 makes every series; round 2, after Prometheus has scraped them, makes them
    // move, so that rates (and quantiles of rates) have something to show.
    drive(&r.eu, "eu", 1).await;
    drive(&r.us, "us", 1).await;
    r.eu.set_setting("limits.max_body_bytes", json!(8 * 1024 * 1024))
        .await;
    let (st, v) = admin(&r.eu, reqwest::Method::POST, "/admin/v1/backup/now", None).await;
    assert_eq!(st, 200, "{v}");
    prom.until(
        "sum by (region) (mcp_server_operation_duration_seconds_count{job=\"haven\",gen_ai_tool_name=\"ev__echo\"})",
        2,
        |v| v >= 2.0,
    )
    .await;
    drive(&r.eu, "eu", 2).await;
    drive(&r.us, "us", 2).await;
    let (st, v) = admin(
        &r.eu,
        reqwest::Method::POST,
        "/admin/v1/backup/verify",
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // The variables' queries: label_values(haven_build_info, job) and (…, region).
    for (label, want) in [("job", vec!["haven"]), ("region", vec!["eu", "us"])] {
        let v: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/label/{label}/values", prom.url))
            .query(&[("match[]", "haven_build_info")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["data"],
            json!(want),
            "label_values(haven_build_info, {label})"
        );
    }

    // Every query of every panel returns at least one series with a number (not NaN: a
    // quantile of nothing is NaN, which Grafana shows as no value). Bounded: each is asked
    // again, every half second, until it answers or 90 s have passed.
    let all = queries(&d);
    assert!(all.len() >= 40, "{} queries", all.len());
    let mut pending: Vec<(PanelQuery, String, Value)> = all
        .into_iter()
        .map(|q| {
            let e = substitute(&q.expr, &["eu", "us"]);
            (q, e, Value::Null)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut still = Vec::new();
        for (q, expr, _) in pending {
            let v = prom.query_raw(&expr).await;
            assert_eq!(
                v["status"], "success",
                "panel \"{}\" ({}): `{expr}` is refused: {v}",
                q.panel, q.ref_id
            );
            let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
            if !result.iter().any(|s| value_of(s).is_finite()) {
                still.push((q, expr, v));
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let failures: Vec<String> = pending
        .iter()
        .map(|(q, expr, v)| {
            format!(
                "panel \"{}\" ({}) shows no data: {expr}\n  last answer: {v}",
                q.panel, q.ref_id
            )
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Replication lag per remote region, both directions, in seconds and entries.
    for (region, peer) in [("eu", "us"), ("us", "eu")] {
        for m in [
            "haven_replication_lag_seconds",
            "haven_replication_lag_entries",
            "haven_region_link_up",
        ] {
            prom.until(
                &format!("{m}{{job=\"haven\",region=\"{region}\",peer_region=\"{peer}\"}}"),
                1,
                |v| v >= 0.0,
            )
            .await;
        }
    }
    // The roles: eu active, us standby.
    prom.until(
        "haven_region_primary{job=\"haven\",region=\"eu\"}",
        1,
        |v| v == 1.0,
    )
    .await;
    prom.until(
        "haven_region_primary{job=\"haven\",region=\"us\"}",
        1,
        |v| v == 0.0,
    )
    .await;

    // Writes on both sides: each region serves the other's note, and the lag Prometheus sees
    // is back to small values (seconds: the age of the peer's newest heartbeat applied here;
    // entries: none left to apply).
    let l_eu = Legacy::connect(&r.eu.url()).await;
    let l_us = Legacy::connect(&r.us.url()).await;
    for (i, (l, name)) in [(&l_eu, "from-eu"), (&l_us, "from-us")]
        .into_iter()
        .enumerate()
    {
        let v = l
            .call_tool(
                i as i64 + 1,
                "notes_put",
                json!({"name": name, "text": "replicated"}),
            )
            .await;
        assert_eq!(v["result"]["isError"], json!(false), "{v}");
    }
    for (l, name) in [(&l_eu, "from-us"), (&l_us, "from-eu")] {
        let mut id = 10;
        let seen = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            id += 1;
            let (l, id) = (l, id);
            async move {
                let v = l.call_tool(id, "notes_get", json!({"name": name})).await;
                v["result"]["content"][0]["text"] == "replicated"
            }
        })
        .await;
        assert!(seen, "{name} was never replicated");
    }
    let caught_up = "haven_replication_lag_seconds{job=\"haven\"} < 5 and on (region, peer_region) haven_replication_lag_entries{job=\"haven\"} == 0";
    let got = prom.until(caught_up, 2, |v| v < 5.0).await;
    let directions: BTreeSet<(String, String)> = got
        .iter()
        .map(|s| {
            (
                s["metric"]["region"].as_str().unwrap().to_owned(),
                s["metric"]["peer_region"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        directions,
        [("eu", "us"), ("us", "eu")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .into()
    );

    drop(prom);
}
