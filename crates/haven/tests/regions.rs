//! Regions against real processes on loopback: two regions, each one nats-server running
//! JetStream in its own domain and one Haven node; region B's server joins region A's by a
//! leafnode through a link of the tests' own (`haven_testkit::Link`), which the tests cut and
//! heal. Each node applies the other region's log (`--peer-regions`).

mod common;

use std::time::{Duration, Instant};

use common::cluster::ONE_REGION_AT_A_TIME;
use common::upstreams::admin;
use common::{Haven, Legacy, run_ok};
use haven_testkit::{Link, NatsCluster, wait_until};
use serde_json::{Value, json};

/// Two regions; fields drop in order: the nodes, the link, then NATS.
struct TwoRegions {
    a: Haven,
    b: Haven,
    link: Link,
    _nats_b: NatsCluster,
    nats_a: NatsCluster,
    _dirs: tempfile::TempDir,
}

async fn node(nats: &NatsCluster, dirs: &tempfile::TempDir, region: &str, peer: &str) -> Haven {
    node_at(
        nats,
        &dirs.path().join(region),
        common::free_port(),
        region,
        peer,
    )
    .await
}

/// Starts (again) region `region`'s node with `data` on `port`.
async fn node_at(
    nats: &NatsCluster,
    data: &std::path::Path,
    port: u16,
    region: &str,
    peer: &str,
) -> Haven {
    node_with(nats, data, port, region, peer, &[]).await
}

/// Like [`node_at`], with extra arguments.
async fn node_with(
    nats: &NatsCluster,
    data: &std::path::Path,
    port: u16,
    region: &str,
    peer: &str,
    extra: &[&str],
) -> Haven {
    let store = nats.url(0);
    let node_id = format!("{region}-node");
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
    ];
    args.extend_from_slice(extra);
    Haven::start(data, port, "default", &args).await
}

async fn two_regions() -> TwoRegions {
    let nats_a = NatsCluster::start_region("A", &[]).await;
    let link = Link::start(nats_a.leaf_port.unwrap()).await;
    let nats_b = NatsCluster::start_region("B", &[link.port]).await;
    let dirs = tempfile::tempdir().unwrap();
    let a = node(&nats_a, &dirs, "A", "B").await;
    let b = node(&nats_b, &dirs, "B", "A").await;
    TwoRegions {
        a,
        b,
        link,
        _nats_b: nats_b,
        nats_a,
        _dirs: dirs,
    }
}

async fn regions(h: &Haven, digest: bool) -> Value {
    let path = if digest {
        "/admin/v1/regions?digest=true"
    } else {
        "/admin/v1/regions"
    };
    let (status, v) = admin(h, reqwest::Method::GET, path, None).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// The text of note `name` as node `h` serves it to session `s`, if any.
async fn note(s: &Legacy, id: i64, name: &str) -> Option<String> {
    let r = s.call_tool(id, "notes_get", json!({ "name": name })).await;
    if r["result"]["isError"] == true || r.get("error").is_some() {
        return None;
    }
    r["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_owned)
}

async fn put(s: &Legacy, id: i64, name: &str, text: &str) {
    let r = s
        .call_tool(id, "notes_put", json!({ "name": name, "text": text }))
        .await;
    assert!(
        r.get("result").is_some() && r["result"]["isError"] != true,
        "{r}"
    );
}

/// Waits (up to `within`) until both regions hold the same state; returns the digest.
async fn converge(r: &TwoRegions, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let da = regions(&r.a, true).await["digest"]["sha256"].clone();
        let db = regions(&r.b, true).await["digest"]["sha256"].clone();
        if da == db {
            return da.as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the regions did not converge within {within:?}: A {da}, B {db}\nA: {}\nB: {}",
            regions(&r.a, false).await,
            regions(&r.b, false).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_region_writes_the_other_serves() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let r = two_regions().await;

    // A session opened in A, a note written through it.
    let in_a = Legacy::connect(&r.a.url()).await;
    put(&in_a, 1, "shared", "written in A").await;
    // The same session continues in B and reads the note there.
    let in_b = in_a.with_url(&r.b.url());
    let mut id = 10;
    let seen = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        id += 1;
        let (s, id) = (&in_b, id);
        async move { note(s, id, "shared").await.as_deref() == Some("written in A") }
    })
    .await;
    assert!(seen, "the note written in A never reached B");
    // And back: B writes, A reads.
    put(&in_b, 100, "from-b", "written in B").await;
    let mut id = 200;
    let seen = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        id += 1;
        let (s, id) = (&in_a, id);
        async move { note(s, id, "from-b").await.as_deref() == Some("written in B") }
    })
    .await;
    assert!(seen, "the note written in B never reached A");

    // A setting changed in A applies in B: B refuses a body over the new limit.
    let (st, v) = admin(
        &r.a,
        reqwest::Method::PUT,
        "/admin/v1/config/limits.max_body_bytes",
        Some(json!({ "value": 2048 })),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let big = json!({"jsonrpc":"2.0","id":900,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x".repeat(4000)}}});
    let refused = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let (s, big) = (&in_b, big.clone());
        async move { s.post_raw(big).await.status() == 413 }
    })
    .await;
    assert!(refused, "the body limit set in A never applied in B");

    // A secret set in A is listed in B (ciphertext replicated; same key-encryption keys).
    let (st, v) = admin(
        &r.a,
        reqwest::Method::PUT,
        "/admin/v1/secrets/api-token",
        Some(json!({ "value": "s3cret" })),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let listed = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let (_, v) = admin(&r.b, reqwest::Method::GET, "/admin/v1/secrets", None).await;
            v.to_string().contains("api-token")
        },
    )
    .await;
    assert!(listed, "the secret set in A never reached B");

    // An upstream registered in A is served by B (B's node connects to it itself).
    common::upstreams::require_tools();
    let mut args = vec!["registry", "add", "ev", "--"];
    let cmd = common::upstreams::everything_stdio_command();
    args.extend(cmd.iter().map(String::as_str));
    common::upstreams::cli_ok(&r.a, &args, None);
    let mut id = 700;
    let served = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
        id += 1;
        let (s, id) = (&in_b, id);
        async move {
            let v = s
                .call_tool(id, "ev__echo", json!({ "message": "across regions" }))
                .await;
            v["result"]["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.contains("across regions"))
        }
    })
    .await;
    assert!(served, "the upstream registered in A was never served by B");

    // Status: each region sees the other replicating, with a lag of seconds at most.
    let ok = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let v = regions(&r.b, false).await;
            let p = &v["peers"][0];
            p["name"] == "A"
                && p["link"] == "replicating"
                && p["lag_seconds"].as_f64().is_some_and(|l| l < 3.0)
                && p["nodes"] == 1
        },
    )
    .await;
    assert!(ok, "{}", regions(&r.b, false).await);
    assert_eq!(regions(&r.a, false).await["peers"][0]["name"], "B");
    let out = run_ok(
        std::process::Command::new(common::haven_bin())
            .args(["region", "status", "--digest", "--node"])
            .arg(format!("http://127.0.0.1:{}", r.b.port))
            .arg("--data")
            .arg(&r.b.data),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Region B") && text.contains("replicating") && text.contains("State digest"),
        "{text}"
    );
    converge(&r, Duration::from_secs(30)).await;

    // An authorization rule set in A is in force in B (issue 13 §3; authentication is off,
    // so the caller is `anonymous`).
    let (status, v) = admin(
        &r.a,
        reqwest::Method::POST,
        "/admin/v1/auth/rules",
        Some(json!({"name": "only-echo", "principals": ["anonymous"], "tools": ["echo"]})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let applied = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            admin(&r.b, reqwest::Method::GET, "/admin/v1/status", None)
                .await
                .1["authorization"]["rules"]
                == json!(1)
        },
    )
    .await;
    assert!(applied, "A's rule is not in force in B");
    let sb = Legacy::connect(&r.b.url()).await;
    let v = sb.request(90, "tools/list", json!({})).await;
    assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["result"]["tools"][0]["name"], "echo", "{v}");

    // The audit log across regions (issue 13 §6): once A has signed its chain and the regions
    // have converged, B holds both chains and verifies them, A's rule change among them.
    let cli = |h: &Haven, args: &[&str]| {
        run_ok(
            std::process::Command::new(common::haven_bin())
                .args(args)
                .arg("--node")
                .arg(format!("http://127.0.0.1:{}", h.port))
                .arg("--data")
                .arg(&h.data),
        )
    };
    cli(&r.a, &["audit", "checkpoint"]);
    cli(&r.b, &["audit", "checkpoint"]);
    converge(&r, Duration::from_secs(30)).await;
    let out = cli(&r.b, &["audit", "verify", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], json!(true), "{v}");
    assert!(v["chains"].as_array().unwrap().len() >= 2, "{v}");
    let out = cli(&r.b, &["audit", "list", "--action", "auth.rule.set"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("only-echo") && text.contains("A-node"),
        "{text}"
    );

    // The status page's overview and `haven status` across regions (issue 14 §5): A shows B
    // and B's node, with its traffic (carried by B's replicated heartbeat) and the lag.
    let ok = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let (_, v) = admin(&r.a, reqwest::Method::GET, "/admin/v1/overview", None).await;
            let b = &v["regions"][1];
            b["name"] == "B"
                && b["state"] == "up"
                && b["nodes"][0]["name"] == "B-node"
                && b["nodes"][0]["state"] == "up"
                && b["nodes"][0]["stats"]["requests_1h"].as_u64() > Some(0)
                && b["lag_seconds"].as_f64().is_some()
                && b["role"].is_string()
        },
    )
    .await;
    let (_, v) = admin(&r.a, reqwest::Method::GET, "/admin/v1/overview", None).await;
    assert!(ok, "A's overview does not show B: {v:#}");
    let out = cli(&r.a, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let role = |i: usize| v["regions"][i]["role"].as_str().unwrap().to_owned();
    assert!(
        text.contains(&format!("Region A (here) — up ({})", role(0))),
        "{text}"
    );
    assert!(
        text.contains(&format!("Region B — up ({})", role(1))),
        "{text}"
    );
    assert!(text.contains("replication here"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("B-node") && l.contains("up")),
        "{text}"
    );
    let page = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/status", r.a.port))
        .bearer_auth(
            std::fs::read_to_string(r.a.data.join("admin.token"))
                .unwrap()
                .trim(),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("data-region=\"B\" data-state=\"up\""),
        "{page}"
    );
    assert!(
        page.contains("data-node=\"B-node\" data-state=\"up\""),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_into_one_state_with_every_write_kept() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let r = two_regions().await;
    let in_a = Legacy::connect(&r.a.url()).await;
    let in_b = Legacy::connect(&r.b.url()).await;
    put(&in_a, 1, "before", "v0").await;
    converge(&r, Duration::from_secs(30)).await;

    // Work running in each region when the link is cut (a streamed call, a task of each
    // era), and a task of each era started on each side during the split. Each ends in its
    // home region during the split; after the heal each has ended exactly once everywhere.
    let http = reqwest::Client::new();
    let mut calls = Vec::new();
    let mut tasks = Vec::new();
    for (k, h) in [&r.a, &r.b].into_iter().enumerate() {
        let id = 60 + 10 * k as i64;
        calls.push(streamed_sleep(&h.url(), id, 3).await);
        tasks.push((k, start_task(&http, &h.url(), true, id + 1, 3).await));
        tasks.push((k, start_task(&http, &h.url(), false, id + 2, 3).await));
    }

    // Cut the link between the regions for 30 s; both keep serving and taking writes, to
    // keys of their own and to the same keys.
    r.link.cut();
    let cut_at = Instant::now();
    for (k, h) in [&r.a, &r.b].into_iter().enumerate() {
        let id = 80 + 10 * k as i64;
        tasks.push((k, start_task(&http, &h.url(), true, id, 2).await));
        tasks.push((k, start_task(&http, &h.url(), false, id + 1, 2).await));
    }
    let mut id = 10;
    let mut i = 0;
    while cut_at.elapsed() < Duration::from_secs(30) {
        id += 4;
        put(&in_a, id, &format!("a-{i}"), "a").await;
        put(&in_b, id + 1, &format!("b-{i}"), "b").await;
        put(&in_a, id + 2, &format!("same-{}", i % 3), &format!("a{i}")).await;
        put(&in_b, id + 3, &format!("same-{}", i % 3), &format!("b{i}")).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let writes = i;
    // Every task has ended in its home region; the other region does not know the end yet.
    let homes = [&r.a, &r.b];
    let mut ended = Vec::new();
    for (n, (home, task)) in tasks.iter().enumerate() {
        let v = task_get(&http, &homes[*home].url(), task, 500 + n as i64).await;
        assert_eq!(
            v["status"], "completed",
            "{} in its home region: {v}",
            task.1
        );
        let other = task_get(&http, &homes[1 - home].url(), task, 600 + n as i64).await;
        assert_ne!(
            other["status"], "completed",
            "{} crossed a cut link: {other}",
            task.1
        );
        ended.push(v);
    }
    // During the split each region says how long it has not heard from the other.
    let v = regions(&r.b, false).await;
    assert!(
        v["peers"][0]["lag_seconds"]
            .as_f64()
            .is_some_and(|l| l > 10.0),
        "B should report A's lag growing: {v}"
    );
    assert!(v["writable"].is_null(), "B stays writable: {v}");
    assert_eq!(v["unreachable"], json!(["A"]), "{v}");
    let out = region_cli(&r.b, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cut off from A"), "{text}");
    let z: Value = reqwest::get(format!("http://127.0.0.1:{}/regionz", r.b.port))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(z["unreachable"], json!(["A"]), "{z}");
    // One of two regions is no majority: not preferred (it serves all the same).
    assert_eq!(z["hears_majority"], false, "{z}");
    assert_eq!(z["preferred"], false, "{z}");
    assert_eq!(note(&in_b, 9000, "a-0").await, None, "the link was cut");

    r.link.heal();
    let healed = Instant::now();
    converge(&r, Duration::from_secs(60)).await;
    eprintln!("converged {:?} after the heal", healed.elapsed());
    // Every write of the split is in both regions; each same key holds the same winner.
    for (s, name) in [(&in_a, "A"), (&in_b, "B")] {
        for k in 0..writes {
            id += 2;
            assert_eq!(
                note(s, id, &format!("a-{k}")).await.as_deref(),
                Some("a"),
                "{name}"
            );
            assert_eq!(
                note(s, id + 1, &format!("b-{k}")).await.as_deref(),
                Some("b"),
                "{name}"
            );
        }
    }
    for k in 0..3 {
        id += 2;
        let in_a_now = note(&in_a, id, &format!("same-{k}")).await;
        let in_b_now = note(&in_b, id + 1, &format!("same-{k}")).await;
        assert!(in_a_now.is_some());
        assert_eq!(in_a_now, in_b_now, "same-{k}");
    }
    assert_eq!(note(&in_b, id + 5, "before").await.as_deref(), Some("v0"));
    // No request answered twice, no task finished twice: each call's stream holds one final
    // answer in both regions, and each task's end is, in both regions, the one its home
    // region showed during the split.
    for h in [&r.a, &r.b] {
        for (client, id, first) in &calls {
            let finals = finals_after(&client.with_url(&h.url()), first, *id).await;
            assert_eq!(finals.len(), 1, "port {}: {finals:?}", h.port);
            assert!(finals[0].get("result").is_some(), "{finals:?}");
        }
        for (n, ((_, task), then)) in tasks.iter().zip(&ended).enumerate() {
            let now = task_get(&http, &h.url(), task, 700 + n as i64).await;
            assert_eq!(&now, then, "{} on port {}", task.1, h.port);
        }
    }
}

/// Starts a legacy `sleep` of `seconds` on its stream, in a session of its own on `url`;
/// returns the session, the request id and the id of the stream's first event (after which
/// a resume replays the rest).
async fn streamed_sleep(url: &str, id: i64, seconds: u64) -> (Legacy, i64, String) {
    let client = Legacy::connect(url).await;
    let resp = client
        .post_raw(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":seconds},"_meta":{"progressToken":format!("p{id}")}}}))
        .await;
    let mut sse = common::SseReader::new(resp);
    let _priming = sse.next().await.unwrap();
    let first = sse.next().await.unwrap();
    (client, id, first.id.unwrap())
}

/// The final answers to request `id` on the stream of `client`'s session after event
/// `after`, read whole (bounded: 5 s).
async fn finals_after(client: &Legacy, after: &str, id: i64) -> Vec<Value> {
    let mut sse = common::SseReader::new(client.resume(after).await);
    let mut finals = Vec::new();
    let read = async {
        while let Some(e) = sse.next().await {
            let v = e.json();
            if v["id"] == id {
                finals.push(v);
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    finals
}

/// A task of a `sleep` of `seconds` on `url`: the 2025-11-25 era's (a session of its own)
/// or the 2026-07-28 era's; `(the legacy session, task id)`.
async fn start_task(
    http: &reqwest::Client,
    url: &str,
    legacy: bool,
    id: i64,
    seconds: u64,
) -> (Option<Legacy>, String) {
    let args = json!({"name": "sleep", "arguments": {"seconds": seconds}});
    let mut session = None;
    let v = if legacy {
        let mut params = args;
        params["task"] = json!({"ttl": 600000});
        let s = Legacy::connect(url).await;
        let v = s.request(id, "tools/call", params).await["result"]["task"].clone();
        session = Some(s);
        v
    } else {
        let caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
        let v: Value = common::stateless(http, url, id, "tools/call", args, caps)
            .await
            .json()
            .await
            .unwrap();
        v["result"].clone()
    };
    let task = v["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no task: {v}"));
    (session, task.to_owned())
}

/// `tasks/get` of `task` (from [`start_task`]) on `url`, in the task's era: its result.
async fn task_get(
    http: &reqwest::Client,
    url: &str,
    task: &(Option<Legacy>, String),
    id: i64,
) -> Value {
    let (session, task) = task;
    let params = json!({"taskId": task});
    if let Some(s) = session {
        s.with_url(url).request(id, "tasks/get", params).await["result"].clone()
    } else {
        let caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
        let v: Value = common::stateless(http, url, id, "tasks/get", params, caps)
            .await
            .json()
            .await
            .unwrap();
        v["result"].clone()
    }
}

/// Runs `haven region ARGS --node <h> --data <its data>`.
fn region_cli(h: &Haven, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::haven_bin())
        .arg("region")
        .args(args)
        .arg("--node")
        .arg(format!("http://127.0.0.1:{}", h.port))
        .arg("--data")
        .arg(&h.data)
        .output()
        .unwrap()
}

/// Which region serves `/regionz` through the load balancer now.
async fn lb_region(lb: &haven_testkit::Proxy) -> Option<String> {
    let r = reqwest::get(format!("http://127.0.0.1:{}/regionz", lb.port))
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["region"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_region_fails_over_behind_the_global_load_balancer_and_fails_back() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut r = two_regions().await;
    let out = region_cli(&r.a, &["promote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The README's recipe: every node in both backends; /regionz picks the active region.
    let nodes = [r.a.port, r.b.port];
    let lb = haven_testkit::Proxy::start_global(&nodes, &nodes).await;
    // HAProxy starts with every server up; wait until its checks have taken B out of the
    // active backend (ten answers in a row from A).
    let on_a = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            for _ in 0..10 {
                if lb_region(&lb).await.as_deref() != Some("A") {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert!(
        on_a,
        "the load balancer never preferred the active region A"
    );

    // A session or task unknown to the standby region B may have just been made in A: B
    // says "retry" (503), not "not found"; A, the active region, says it does not exist.
    let http = reqwest::Client::new();
    let caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
    let unknown_task = |url: String| {
        let (http, caps) = (&http, caps.clone());
        async move {
            let r = common::stateless(
                http,
                &url,
                1,
                "tasks/get",
                json!({"taskId": "0123456789abcdef0123456789abcdef"}),
                caps,
            )
            .await;
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let retry_on_b = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let f = unknown_task(r.b.url());
        async move {
            let (status, body) = f.await;
            status == 503 && body.contains("not the active region (A)")
        }
    })
    .await;
    assert!(retry_on_b, "{:?}", unknown_task(r.b.url()).await);
    let (status, body) = unknown_task(r.a.url()).await;
    assert!(body.contains("Task not found"), "{status} {body}");
    let stranger = Legacy {
        client: reqwest::Client::new(),
        url: r.b.url(),
        session: "0123456789abcdef0123456789abcdef".into(),
    };
    let in_b = stranger
        .post_raw(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
        .await;
    assert_eq!(in_b.status(), 503);
    assert!(in_b.headers().contains_key("retry-after"));
    let in_a = stranger
        .with_url(&r.a.url())
        .post_raw(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
        .await;
    assert_eq!(in_a.status(), 404);

    // A client through the load balancer: a session (on A), a note, replicated to B.
    let client = Legacy::connect(&lb.url()).await;
    put(&client, 1, "before-loss", "v1").await;
    let direct_b = client.with_url(&r.b.url());
    let mut id = 10;
    let replicated = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        id += 1;
        let (s, id) = (&direct_b, id);
        async move { note(s, id, "before-loss").await.as_deref() == Some("v1") }
    })
    .await;
    assert!(replicated);

    // Client load through the load balancer in both eras, from before the loss until after
    // B serves: writes to keys of their own, each with when it was sent and whether it was
    // acknowledged.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for legacy in [true, false] {
        let (stop, url) = (stop.clone(), lb.url());
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut sent = Vec::new();
            for n in 0..3000i64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let era = if legacy { "legacy" } else { "2026" };
                let key = format!("load-{era}-{n}");
                let started = Instant::now();
                let ok = try_note_put(&http, &url, legacy, 10_000 + n, &key, "v").await;
                sent.push((key, started, ok.then(Instant::now)));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        }));
    }
    // The replication lag B measures under this load (the largest of a few samples).
    let mut lag = 0.0f64;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(l) = regions(&r.b, false).await["peers"][0]["lag_seconds"].as_f64() {
            lag = lag.max(l);
        }
    }

    // Region A is lost: every process of it killed.
    r.a.kill9();
    r.nats_a.kill9(0);
    let lost = Instant::now();
    // The same session continues through the load balancer, now on B.
    let mut id = 100;
    let mut served = None;
    while lost.elapsed() < Duration::from_secs(30) {
        id += 1;
        let resp = client
            .post_raw(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"notes_get","arguments":{"name":"before-loss"}}}))
            .await;
        if resp.status() == 200 {
            let v = common::final_response(resp, id).await;
            if v["result"]["content"][0]["text"] == "v1" {
                served = Some(lost.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = served.expect("the session never continued in region B");
    // How long that took is measured by region-bench (BENCHMARKS.md), not asserted here.
    eprintln!("client-visible region failover through the load balancer: {served:?}");
    put(&client, 2000, "during-loss", "v2").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = Vec::new();
    for l in load {
        sent.extend(l.await.unwrap());
    }
    let acked: Vec<(String, Instant, Instant)> = sent
        .iter()
        .filter_map(|(k, started, at)| at.map(|at| (k.clone(), *started, at)))
        .collect();
    // Every write acknowledged more than the lag before the loss is in B, and every write
    // sent after it; those of the last `lag` before it that B lacks are the loss's RPO.
    let http = reqwest::Client::new();
    let window = Duration::from_secs_f64(lag);
    let (mut old_missing, mut recent_missing) = (Vec::new(), Vec::new());
    for (k, (key, started, at)) in acked.iter().enumerate() {
        let held = try_note_get(&http, &r.b.url(), 20_000 + k as i64, key).await;
        if held.as_ref().is_ok_and(Option::is_some) {
            continue;
        }
        if *at + window < lost || *started > lost {
            old_missing.push((key.clone(), held));
        } else {
            recent_missing.push(key.clone());
        }
    }
    assert!(
        old_missing.is_empty(),
        "acknowledged writes missing in B: {old_missing:?} (lag {lag:.3} s)"
    );
    eprintln!(
        "load through the load balancer: {} writes sent, {} acknowledged; lag before the loss {lag:.3} s; acknowledged within it and missing in B (the RPO): {}",
        sent.len(),
        acked.len(),
        recent_missing.len()
    );

    // Promoting B while A's writes may be missing is refused without --force.
    let refused = region_cli(&r.b, &["promote"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--force"), "{why}");
    let forced = region_cli(&r.b, &["promote", "--force"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );

    // A returns: it catches up (B's writes of the outage), learns it is a standby, and the
    // load balancer stays on B.
    r.nats_a.restart(0).await;
    let (data, port) = (r.a.data.clone(), r.a.port);
    r.a = node_at(&r.nats_a, &data, port, "A", "B").await;
    let direct_a = client.with_url(&r.a.url());
    let mut id = 3000;
    let caught_up = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        id += 1;
        let (s, id) = (&direct_a, id);
        async move { note(s, id, "during-loss").await.as_deref() == Some("v2") }
    })
    .await;
    assert!(caught_up, "A never caught up with B's writes");
    // B's promotion is further in B's log than that note: A applies it a moment later, and
    // until A has caught up with B its /regionz does not claim it is preferred. (The load
    // balancer may still send a request to A meanwhile: while B cannot hear A's restarted
    // servers yet, two regions have no majority, B is not preferred either, and the
    // balancer falls back to every ready node.)
    let mut learned = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if regions(&r.a, false).await["role"] == "standby" {
            learned = true;
            break;
        }
        let a_regionz = reqwest::get(format!("http://127.0.0.1:{}/regionz", r.a.port))
            .await
            .unwrap();
        assert_ne!(
            a_regionz.status(),
            200,
            "A claimed to be preferred before it learned B's promotion: {}",
            a_regionz.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        learned,
        "A never learned it is a standby: {}",
        regions(&r.a, false).await
    );
    // Once B hears A again, the balancer settles on B.
    assert!(
        lb_settled_on(&lb, "B", Duration::from_secs(30)).await,
        "the load balancer did not settle on B: {}",
        regions(&r.b, false).await
    );

    // Planned switchover back: demote B, then promote A once it has applied all of B's log.
    let out = region_cli(&r.b, &["demote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let promoted = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async { region_cli(&r.a, &["promote"]).status.success() },
    )
    .await;
    assert!(
        promoted,
        "A could not be promoted: {}",
        regions(&r.a, false).await
    );
    let back = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { lb_region(&lb).await.as_deref() == Some("A") },
    )
    .await;
    assert!(back, "the load balancer never went back to A");
    // Nothing was lost: every note is in both regions, and their states are equal.
    let mut id = 5000;
    for name in ["before-loss", "during-loss"] {
        id += 1;
        assert!(note(&client, id, name).await.is_some(), "{name}");
    }
    converge(&r, Duration::from_secs(30)).await;
    // After the failback every acknowledged write is in both regions: also those A took
    // just before it was lost, which B lacked until A returned.
    for (h, name) in [(&r.a, "A"), (&r.b, "B")] {
        for (k, (key, _, _)) in acked.iter().enumerate() {
            let held = try_note_get(&http, &h.url(), 40_000 + k as i64, key).await;
            assert_eq!(held, Ok(Some("v".to_owned())), "{key} in {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_lost_region_continue_in_another() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut r = two_regions().await;
    let http = reqwest::Client::new();
    let in_a = Legacy::connect(&r.a.url()).await;

    // A task of each form, created in A.
    let created = in_a
        .request(
            1,
            "tools/call",
            json!({"name":"sleep","arguments":{"seconds":2},"task":{"ttl":600000}}),
        )
        .await;
    let legacy_task = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let tasks_caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
    let created: Value = common::stateless(
        &http,
        &r.a.url(),
        2,
        "tools/call",
        json!({"name":"sleep","arguments":{"seconds":2}}),
        tasks_caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    let ext_task = created["result"]["taskId"].as_str().unwrap().to_owned();

    // A long idempotent call with progress, running in A when A is lost.
    let resp = in_a
        .post_raw(json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":8},"_meta":{"progressToken":"far"}}}))
        .await;
    let mut sse = common::SseReader::new(resp);
    let _priming = sse.next().await.unwrap();
    let first = sse.next().await.unwrap();
    let second = sse.next().await.unwrap();
    assert_eq!(second.json()["method"], "notifications/progress");
    // Both tasks ended in A, and those ends reached B, before the loss.
    let in_b = in_a.with_url(&r.b.url());
    let mut id = 100;
    let ended = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        id += 1;
        let (s, id, t) = (&in_b, id, legacy_task.clone());
        async move {
            let v = s.request(id, "tasks/get", json!({"taskId": t})).await;
            v["result"]["status"] == "completed"
        }
    })
    .await;
    assert!(
        ended,
        "the experimental task created in A never showed completed in B"
    );
    let v: Value = common::stateless(
        &http,
        &r.b.url(),
        200,
        "tasks/get",
        json!({"taskId": ext_task}),
        tasks_caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(
        v.get("result").is_some(),
        "the task created in A is unknown in B: {v}"
    );
    // Give the second progress event time to cross, then lose region A.
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.a.kill9();
    r.nats_a.kill9(0);
    drop(sse);

    // The session continues in B: resuming after the first event replays what had crossed.
    let resumed = in_b.resume(first.id.as_deref().unwrap()).await;
    assert_eq!(resumed.status(), 200);
    let mut sse = common::SseReader::new(resumed);
    let again = tokio::time::timeout(Duration::from_secs(10), sse.next())
        .await
        .expect("the replicated event was not replayed in B")
        .unwrap();
    assert_eq!(again.id, second.id);
    assert_eq!(again.json(), second.json());

    // A returns: its own recovery settles the interrupted call (the same node, restarted,
    // ends it with the "interrupted" error rather than running it again), and the client,
    // still resumed in B, gets exactly one final answer.
    r.nats_a.restart(0).await;
    let (data, port) = (r.a.data.clone(), r.a.port);
    r.a = node_at(&r.nats_a, &data, port, "A", "B").await;
    let mut finals = 0;
    let rest = async {
        while let Some(e) = sse.next().await {
            let v = e.json();
            if v["id"] == 7 {
                finals += 1;
                assert_eq!(v["error"]["data"]["interrupted"], true, "{v}");
                assert_eq!(v["error"]["data"]["retryable"], true, "{v}");
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), rest)
        .await
        .expect("the interrupted call never ended in B after A returned");
    assert_eq!(finals, 1);

    // A 2026-07-28 request state sealed in A verifies in B (the keys are replicated secrets).
    let (st, v) = admin(
        &r.a,
        reqwest::Method::PUT,
        "/admin/v1/config/catalog",
        Some(json!({ "value": "conformance" })),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let caps = json!({"elicitation":{}});
    let tool = json!({"name":"test_input_required_result_request_state","arguments":{}});
    // Until the setting has applied: a bounded loop.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let v: Value = common::stateless(
            &http,
            &r.a.url(),
            300,
            "tools/call",
            tool.clone(),
            caps.clone(),
        )
        .await
        .json()
        .await
        .unwrap();
        if v["result"]["resultType"] == "input_required" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the conformance catalog never applied in A: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();
    let key = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let mut retry = tool.clone();
    retry["inputResponses"] = json!({ key: {"action":"accept","content":{"ok":true}} });
    retry["requestState"] = json!(state);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: Value = common::stateless(
            &http,
            &r.b.url(),
            301,
            "tools/call",
            retry.clone(),
            caps.clone(),
        )
        .await
        .json()
        .await
        .unwrap();
        if done["result"]["resultType"] == "complete" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a request state sealed in A did not verify in B: {done}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_region_is_built_from_backups_and_catches_up() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let dirs = tempfile::tempdir().unwrap();
    let backups = dirs.path().join("backups");
    // A second location (say, a bucket in another region): the new region is built from it.
    let remote_backups = dirs.path().join("remote-backups");
    let key = dirs.path().join("backup.key");
    let out = run_ok(
        std::process::Command::new(common::haven_bin())
            .args(["backup", "keygen", "--out"])
            .arg(&key),
    );
    assert!(out.status.success());
    let nats_a = NatsCluster::start_region("A", &[]).await;
    let a = node_with(
        &nats_a,
        &dirs.path().join("A"),
        common::free_port(),
        "A",
        "C",
        &[
            "--backup-url",
            backups.to_str().unwrap(),
            "--backup-key-file",
            key.to_str().unwrap(),
            "--backup-also",
            remote_backups.to_str().unwrap(),
            // Ships only when asked below, so that what follows is not in the backup.
            "--backup-interval",
            "1h",
        ],
    )
    .await;
    let in_a = Legacy::connect(&a.url()).await;
    for i in 0..20 {
        put(&in_a, i, &format!("backed-up-{i}"), "b").await;
    }
    let (st, v) = admin(
        &a,
        reqwest::Method::POST,
        "/admin/v1/backup/now?snapshot=true",
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // Both locations shipped, each with its own status and lag.
    assert_eq!(v["also"][0]["snapshot"], true, "{v}");
    // Shipped after the main one, it holds at least as much of the log.
    assert!(
        v["also"][0]["shipped_seq"].as_u64() >= v["shipped_seq"].as_u64(),
        "{v}"
    );
    let (_, b) = admin(&a, reqwest::Method::GET, "/admin/v1/backup", None).await;
    assert_eq!(
        b["also"][0]["target"],
        remote_backups.to_str().unwrap(),
        "{b}"
    );
    assert!(b["also"][0]["lag_entries"].is_number(), "{b}");
    // Written after the backup: the new region gets these from A's log, not from the backup.
    for i in 0..10 {
        put(&in_a, 100 + i, &format!("after-backup-{i}"), "l").await;
    }

    // Region C, cold: a nats-server joined to A, its store built from A's backup.
    let link = Link::start(nats_a.leaf_port.unwrap()).await;
    let nats_c = NatsCluster::start_region("C", &[link.port]).await;
    // Before C has a stream, A says what is missing and what to check.
    let explained = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async {
            regions(&a, false).await["peers"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("was not found in JetStream domain \"C\""))
        },
    )
    .await;
    assert!(explained, "{}", regions(&a, false).await);
    let bootstrap = || {
        let mut c = std::process::Command::new(common::haven_bin());
        c.args(["region", "bootstrap", "--backup-url"])
            .arg(&remote_backups)
            .arg("--backup-key-file")
            .arg(&key)
            .args(["--store", &nats_c.url(0), "--region", "C"])
            .args(["--store-replicas", "1"]);
        c
    };
    let out = run_ok(&mut bootstrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("from region A"), "{text}");
    // The backup ends before the later notes: those come from A's log.
    let restored: u64 = text
        .split("as of its sequence ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sequence in {text}"));
    let (_, status) = admin(&a, reqwest::Method::GET, "/admin/v1/status", None).await;
    let a_last = status["store"]["last_seq"].as_u64().unwrap();
    assert!(
        restored > 0 && restored + 10 <= a_last,
        "restored {restored}, A at {a_last}"
    );
    // Bootstrapping again into the same region is refused.
    let again = bootstrap().output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));
    // Servers of another domain are refused, before anything is created on them: a
    // bootstrap or a node naming region X on C's servers.
    let wrong = std::process::Command::new(common::haven_bin())
        .args(["region", "bootstrap", "--backup-url"])
        .arg(&backups)
        .arg("--backup-key-file")
        .arg(&key)
        .args(["--store", &nats_c.url(0), "--region", "X"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let why = String::from_utf8_lossy(&wrong.stderr);
    assert!(why.contains("JetStream domain \"C\""), "{why}");
    let wrong = std::process::Command::new(common::haven_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dirs.path().join("X"))
        .args([
            "--store",
            &nats_c.url(0),
            "--region",
            "X",
            "--peer-regions",
            "A",
        ])
        .env("HAVEN_SECRETS_KEYS", common::TEST_SECRETS_KEYS)
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let why = String::from_utf8_lossy(&wrong.stderr);
    assert!(why.contains("JetStream domain \"C\""), "{why}");

    let c = node_with(
        &nats_c,
        &dirs.path().join("C"),
        common::free_port(),
        "C",
        "A",
        &[],
    )
    .await;
    let in_c = in_a.with_url(&c.url());
    let mut id = 1000;
    for name in (0..20)
        .map(|i| format!("backed-up-{i}"))
        .chain((0..10).map(|i| format!("after-backup-{i}")))
    {
        let found = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            id += 1;
            let (s, id, name) = (&in_c, id, name.clone());
            async move { note(s, id, &name).await.is_some() }
        })
        .await;
        assert!(found, "{name} never reached region C");
    }
    // C's writes reach A, and both converge to one state.
    put(&in_c, 5000, "from-c", "c").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let da = regions(&a, true).await["digest"]["sha256"].clone();
        let dc = regions(&c, true).await["digest"]["sha256"].clone();
        if da == dc {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A {da} and C {dc} never converged"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(note(&in_a, 6000, "from-c").await.as_deref(), Some("c"));
    // The bootstrap is in C's audit log (a chain of the command's own, signed with a key of
    // that run), and C's log verifies with A's chains replicated into it.
    let cli = |args: &[&str]| {
        run_ok(
            std::process::Command::new(common::haven_bin())
                .args(args)
                .arg("--node")
                .arg(format!("http://127.0.0.1:{}", c.port))
                .arg("--data")
                .arg(&c.data),
        )
    };
    let out = cli(&["audit", "list", "--action", "region.bootstrap"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("region.bootstrap") && text.contains("operator"),
        "{text}"
    );
    let out = cli(&["audit", "verify", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], json!(true), "{v}");
    drop((c, a, link, nats_c, nats_a));
}

/// Which region `/regionz` through the load balancer names, ten times in a row.
async fn lb_settled_on(lb: &haven_testkit::Proxy, region: &str, within: Duration) -> bool {
    wait_until(within, Duration::from_millis(100), || async {
        for _ in 0..10 {
            if lb_region(lb).await.as_deref() != Some(region) {
                return false;
            }
        }
        true
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_fail_over_by_majority_without_an_operator() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    // The README's three regions: each joins a hub (plain NATS, no JetStream) by a leafnode,
    // so that losing one region leaves the others joined (leafnodes may not form a cycle).
    let hub = NatsCluster::start_hub().await;
    let leaf = [hub.leaf_port.unwrap()];
    let mut nats_a = NatsCluster::start_region("A", &leaf).await;
    let nats_b = NatsCluster::start_region("B", &leaf).await;
    let nats_c = NatsCluster::start_region("C", &leaf).await;
    let dirs = tempfile::tempdir().unwrap();
    let port = common::free_port;
    let mut a = node_at(&nats_a, &dirs.path().join("A"), port(), "A", "B,C").await;
    let b = node_at(&nats_b, &dirs.path().join("B"), port(), "B", "A,C").await;
    let c = node_at(&nats_c, &dirs.path().join("C"), port(), "C", "A,B").await;
    let out = region_cli(&a, &["promote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes = [a.port, b.port, c.port];
    let lb = haven_testkit::Proxy::start_global(&nodes, &nodes).await;
    if !lb_settled_on(&lb, "A", Duration::from_secs(30)).await {
        for h in [&a, &b, &c] {
            let z: Value = reqwest::get(format!("http://127.0.0.1:{}/regionz", h.port))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            eprintln!("{z}\n{}", regions(h, false).await);
        }
        panic!("the load balancer never settled on A");
    }
    let client = Legacy::connect(&lb.url()).await;
    put(&client, 1, "before", "v").await;
    // A call and a task running in A when it is lost (started under A's lease).
    let leased = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async { lease_holds(&a).await == Some(true) },
    )
    .await;
    assert!(leased, "{}", regions(&a, false).await);
    let caller = Legacy::connect(&lb.url()).await;
    let resp = caller
        .post_raw(json!({"jsonrpc":"2.0","id":50,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":8},"_meta":{"progressToken":"lost"}}}))
        .await;
    let mut sse = common::SseReader::new(resp);
    let _priming = sse.next().await.unwrap();
    let first = sse.next().await.unwrap();
    let last_seen = first.id.clone().unwrap();
    let created = caller
        .request(
            51,
            "tools/call",
            json!({"name":"sleep","arguments":{"seconds":8},"task":{"ttl":600000}}),
        )
        .await;
    let task = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    // A task of the 2026-07-28 era too.
    let http = reqwest::Client::new();
    let tasks_caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
    let created: Value = common::stateless(
        &http,
        &lb.url(),
        53,
        "tools/call",
        json!({"name":"sleep","arguments":{"seconds":8}}),
        tasks_caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    let ext_task = created["result"]["taskId"].as_str().unwrap().to_owned();
    let ext_status = |url: String, id: i64| {
        let (http, caps, t) = (http.clone(), tasks_caps.clone(), ext_task.clone());
        async move {
            let v: Value =
                common::stateless(&http, &url, id, "tasks/get", json!({"taskId": t}), caps)
                    .await
                    .json()
                    .await
                    .unwrap_or(Value::Null);
            v["result"]["status"].as_str().map(str::to_owned)
        }
    };
    let crossed = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            ext_status(b.url(), 54).await.is_some()
                && caller.with_url(&b.url()).resume(&last_seen).await.status() == 200
                && caller
                    .with_url(&b.url())
                    .request(52, "tasks/get", json!({"taskId": task}))
                    .await
                    .get("result")
                    .is_some()
        },
    )
    .await;
    assert!(crossed, "A's call and task never reached B");
    drop(sse);

    // Region A is lost. B and C each find it silent for 3 checks of 1 s, publish their
    // verdicts, and B (first by name of the majority) makes itself active; the load balancer
    // follows /regionz.
    a.kill9();
    nats_a.kill9(0);
    let lost = Instant::now();
    assert!(
        lb_settled_on(&lb, "B", Duration::from_secs(60)).await,
        "{}",
        regions(&b, false).await
    );
    eprintln!(
        "active role moved to B {:?} after region A was lost",
        lost.elapsed()
    );
    let roles = regions(&c, false).await["roles"].clone();
    assert_eq!(roles["active"], "B", "{roles}");
    assert!(
        roles["reason"]
            .as_str()
            .unwrap()
            .contains("automatic failover"),
        "{roles}"
    );
    // The session goes on (on B, through the load balancer) with what A had written.
    assert_eq!(note(&client, 2, "before").await.as_deref(), Some("v"));
    // Once A's lease has run out, a survivor (the one that applied the most of A's log, then
    // B by name) takes over A's running work without an operator: the call resumed through
    // the load balancer gets one final result, the task completes.
    let resp = caller.resume(&last_seen).await;
    assert_eq!(resp.status(), 200);
    let mut resumed = common::SseReader::new(resp);
    let (_, fin) = tokio::time::timeout(Duration::from_secs(90), until_final(&mut resumed, 50))
        .await
        .expect("the call running in the lost region never ended");
    assert!(fin.get("result").is_some(), "{fin}");
    eprintln!(
        "the lost region's call ended in B {:?} after the loss",
        lost.elapsed()
    );
    let mut poll = 60;
    let completed = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
        poll += 1;
        let (s, id, t) = (&caller, poll, task.clone());
        async move {
            s.request(id, "tasks/get", json!({"taskId": t})).await["result"]["status"]
                == "completed"
        }
    })
    .await;
    assert!(completed, "the lost region's task never completed in B");
    let completed = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async { ext_status(lb.url(), 55).await.as_deref() == Some("completed") },
    )
    .await;
    assert!(
        completed,
        "the lost region's 2026-07-28 task never completed in B"
    );

    // A returns as a standby: it learns the newer roles and is not preferred.
    nats_a.restart(0).await;
    let data = dirs.path().join("A");
    a = node_at(&nats_a, &data, a.port, "A", "B,C").await;
    let standby = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async { regions(&a, false).await["role"] == "standby" },
    )
    .await;
    assert!(standby, "{}", regions(&a, false).await);
    assert!(lb_settled_on(&lb, "B", Duration::from_secs(10)).await);
    // A applied B's takeover before settling its own dead process's work: the stream, read
    // whole in A, holds exactly one final answer, and the task is completed there.
    let recovered = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            caller
                .with_url(&a.url())
                .request(70, "tasks/get", json!({"taskId": task}))
                .await["result"]["status"]
                == "completed"
        },
    )
    .await;
    assert!(recovered, "A never applied the task's end");
    assert_eq!(ext_status(a.url(), 71).await.as_deref(), Some("completed"));
    let whole = caller.with_url(&a.url()).resume(&last_seen).await;
    let mut sse = common::SseReader::new(whole);
    let mut finals = Vec::new();
    let read = async {
        while let Some(e) = sse.next().await {
            let v = e.json();
            if v["id"] == 50 {
                finals.push(v);
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert!(finals[0].get("result").is_some(), "{finals:?}");
    drop((lb, a, b, c, nats_a, nats_b, nats_c, hub));
}

/// Reads the rest of a resumed stream until request `id`'s final answer; the number of
/// progress events before it, and the answer.
async fn until_final(sse: &mut common::SseReader, id: i64) -> (usize, Value) {
    let mut progress = 0;
    while let Some(e) = sse.next().await {
        let v = e.json();
        if v["method"] == "notifications/progress" {
            progress += 1;
        }
        if v["id"] == id {
            return (progress, v);
        }
    }
    panic!("the stream of {id} ended without a final answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_takes_over_a_lost_regions_running_work_and_each_request_ends_once() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let mut r = two_regions().await;
    let http = reqwest::Client::new();
    // In region A when it is lost: three long legacy calls on their streams, and a task of
    // each form.
    let mut calls = Vec::new();
    for i in 0..3i64 {
        let client = Legacy::connect(&r.a.url()).await;
        let id = 10 + i;
        let resp = client
            .post_raw(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":6},"_meta":{"progressToken":format!("lost-{i}")}}}))
            .await;
        let mut sse = common::SseReader::new(resp);
        let _priming = sse.next().await.unwrap();
        let first = sse.next().await.unwrap();
        calls.push((client, id, first));
    }
    let legacy = Legacy::connect(&r.a.url()).await;
    let created = legacy
        .request(
            20,
            "tools/call",
            json!({"name":"sleep","arguments":{"seconds":6},"task":{"ttl":600000}}),
        )
        .await;
    let legacy_task = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let tasks_caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
    let created: Value = common::stateless(
        &http,
        &r.a.url(),
        21,
        "tools/call",
        json!({"name":"sleep","arguments":{"seconds":6}}),
        tasks_caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    let ext_task = created["result"]["taskId"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(800)).await;
    r.a.kill9();
    r.nats_a.kill9(0);

    // Every client resumes in B and gets what had crossed (at least the event it saw).
    let mut resumed = Vec::new();
    for (client, id, first) in &calls {
        let in_b = client.with_url(&r.b.url());
        let resp = in_b.resume(first.id.as_deref().unwrap()).await;
        assert_eq!(resp.status(), 200);
        resumed.push((common::SseReader::new(resp), *id));
    }

    // The takeover needs the region silent here, and the operator's confirmation.
    let silent = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async { regions(&r.b, false).await["unreachable"] == json!(["A"]) },
    )
    .await;
    assert!(silent);
    let refused = region_cli(&r.b, &["takeover", "A"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--confirm-dead"));
    let out = region_cli(&r.b, &["takeover", "A", "--confirm-dead"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("took over 5"), "{text}");

    // B runs each idempotent call again into its stream: every resumed client gets progress
    // and one final result.
    for (sse, id) in &mut resumed {
        let (progress, fin) = tokio::time::timeout(Duration::from_secs(60), until_final(sse, *id))
            .await
            .expect("a taken-over call never ended");
        assert!(progress > 0, "{id}");
        assert!(fin.get("result").is_some(), "{fin}");
    }
    // Both tasks were adopted by B and complete there.
    let in_b = legacy.with_url(&r.b.url());
    let mut poll = 100;
    let done = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
        poll += 1;
        let (s, id, t) = (&in_b, poll, legacy_task.clone());
        async move {
            s.request(id, "tasks/get", json!({"taskId": t})).await["result"]["status"]
                == "completed"
        }
    })
    .await;
    assert!(done, "the experimental task of A never completed in B");
    let done = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let v: Value = common::stateless(
                &http,
                &r.b.url(),
                300,
                "tasks/get",
                json!({"taskId": ext_task}),
                tasks_caps.clone(),
            )
            .await
            .json()
            .await
            .unwrap();
            v["result"]["status"] == "completed"
        },
    )
    .await;
    assert!(done, "the extension task of A never completed in B");

    // A returns: its node applies B's takeover before settling anything, so nothing is ended
    // a second time. Every stream, read whole in A, holds exactly one final answer, a result.
    r.nats_a.restart(0).await;
    let (data, port) = (r.a.data.clone(), r.a.port);
    r.a = node_at(&r.nats_a, &data, port, "A", "B").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    for (client, id, first) in &calls {
        let whole = client
            .with_url(&r.a.url())
            .resume(first.id.as_deref().unwrap())
            .await;
        let mut sse = common::SseReader::new(whole);
        let mut finals = Vec::new();
        let read = async {
            while let Some(e) = sse.next().await {
                let v = e.json();
                if v["id"] == *id {
                    finals.push(v);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        assert_eq!(finals.len(), 1, "{finals:?}");
        assert!(finals[0].get("result").is_some(), "{finals:?}");
    }
    let in_a = legacy.with_url(&r.a.url());
    let v = in_a
        .request(400, "tasks/get", json!({"taskId": legacy_task}))
        .await;
    assert_eq!(v["result"]["status"], "completed", "{v}");
}

/// Three regions through the hub, region A's leafnode through a link the test cuts: what A is
/// running when it is cut off is taken over by B without an operator, once A's lease has run
/// out; A, alive all along, stops writing that work, and after the heal every request has
/// exactly one final answer in every region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_regions_running_work_is_taken_over_without_an_operator_and_ends_once() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let ThreeRegions {
        a,
        b,
        c,
        link,
        rest,
    } = three_regions("A", "A").await;

    // Running in A when it is cut off: two long legacy calls on their streams, and a task of
    // each form. All were started under A's lease, so another region may take them over.
    let http = reqwest::Client::new();
    let mut calls = Vec::new();
    for i in 0..2i64 {
        let client = Legacy::connect(&a.url()).await;
        let id = 10 + i;
        let resp = client
            .post_raw(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":8},"_meta":{"progressToken":format!("cut-{i}")}}}))
            .await;
        let mut sse = common::SseReader::new(resp);
        let _priming = sse.next().await.unwrap();
        let first = sse.next().await.unwrap();
        calls.push((client, id, first, sse));
    }
    let legacy = Legacy::connect(&a.url()).await;
    let created = legacy
        .request(
            20,
            "tools/call",
            json!({"name":"sleep","arguments":{"seconds":8},"task":{"ttl":600000}}),
        )
        .await;
    let legacy_task = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let tasks_caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
    let created: Value = common::stateless(
        &http,
        &a.url(),
        21,
        "tools/call",
        json!({"name":"sleep","arguments":{"seconds":8}}),
        tasks_caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    let ext_task = created["result"]["taskId"].as_str().unwrap().to_owned();
    // Until B holds A's calls up to the events their clients saw.
    let crossed = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let mut all = true;
            for (client, _, first, _) in &calls {
                let resp = client
                    .with_url(&b.url())
                    .resume(first.id.as_deref().unwrap())
                    .await;
                all &= resp.status() == 200;
            }
            all
        },
    )
    .await;
    assert!(crossed, "A's streams never reached B");
    // A call that ends just after the cut, before A's lease lapses: A stores its final
    // answer then, but no other region holds it, so it is not the request's answer yet.
    let late_id = 12;
    let late_client = Legacy::connect(&a.url()).await;
    let resp = late_client
        .post_raw(json!({"jsonrpc":"2.0","id":late_id,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":3},"_meta":{"progressToken":"late"}}}))
        .await;
    let mut late_sse = common::SseReader::new(resp);
    let _priming = late_sse.next().await.unwrap();
    let late_first = late_sse.next().await.unwrap();
    let late_crossed = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            late_client
                .with_url(&b.url())
                .resume(late_first.id.as_deref().unwrap())
                .await
                .status()
                == 200
        },
    )
    .await;
    assert!(late_crossed, "the late call never reached B");
    // Cut once it reports its second second: its answer comes a second later, while A's
    // lease (renewed until the cut) still holds.
    loop {
        let e = late_sse
            .next()
            .await
            .expect("the late call's stream ended early");
        if e.json()["params"]["progress"].as_f64() >= Some(2.0) {
            break;
        }
    }

    link.cut();
    let cut = Instant::now();
    // A, cut off from both others, loses its lease: its running work waits.
    let lapsed = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async { lease_holds(&a).await == Some(false) },
    )
    .await;
    assert!(lapsed, "{}", regions(&a, false).await);
    // The late call's final answer is stored in A and waits for a majority there; a client
    // resuming on A does not get it.
    let waits = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async {
            std::fs::read_to_string(&a.log).is_ok_and(|l| {
                l.contains("the execution's last write waits until a majority of regions holds it")
            })
        },
    )
    .await;
    assert!(waits, "the late call's final answer was never stored in A");
    let shown = finals_after(&late_client, late_first.id.as_deref().unwrap(), late_id).await;
    assert!(
        shown.is_empty(),
        "A showed a final answer that no other region holds: {shown:?}"
    );
    calls.push((late_client, late_id, late_first, late_sse));
    eprintln!("A's lease lapsed {:?} after the cut", cut.elapsed());
    // B and C find A silent and freeze it; the one that applied the most of A's log (then
    // B, first by name) decides once A's lease has run out, and claims A's work: it runs the
    // idempotent calls again and adopts the tasks.
    let done = wait_until(
        Duration::from_secs(90),
        Duration::from_millis(250),
        || async {
            let v = regions(&b, false).await;
            v["takeover"]["takeovers"]
                .as_array()
                .is_some_and(|t| t.iter().any(|x| x["source"] == "A" && x["stage"] == "done"))
        },
    )
    .await;
    assert!(
        done,
        "no region took over A's work: {}",
        regions(&b, false).await
    );
    let status = regions(&b, false).await;
    let t = status["takeover"]["takeovers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["source"] == "A" && x["stage"] == "done")
        .unwrap()
        .clone();
    assert_eq!(t["claimed"], 5, "{t}");
    eprintln!(
        "{} took over A's work {:?} after the cut",
        t["claimer"],
        cut.elapsed()
    );

    // Each client resumes in B and gets one final result.
    for (client, id, first, _) in &calls {
        let resp = client
            .with_url(&b.url())
            .resume(first.id.as_deref().unwrap())
            .await;
        assert_eq!(resp.status(), 200);
        let mut sse = common::SseReader::new(resp);
        let (_, fin) = tokio::time::timeout(Duration::from_secs(60), until_final(&mut sse, *id))
            .await
            .expect("a taken-over call never ended in B");
        assert!(fin.get("result").is_some(), "{fin}");
    }
    let in_b = legacy.with_url(&b.url());
    let mut poll = 100;
    let completed = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
        poll += 1;
        let (s, id, t) = (&in_b, poll, legacy_task.clone());
        async move {
            s.request(id, "tasks/get", json!({"taskId": t})).await["result"]["status"]
                == "completed"
        }
    })
    .await;
    assert!(completed, "A's experimental task never completed in B");
    let completed = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let v: Value = common::stateless(
                &http,
                &b.url(),
                300,
                "tasks/get",
                json!({"taskId": ext_task}),
                tasks_caps.clone(),
            )
            .await
            .json()
            .await
            .unwrap();
            v["result"]["status"] == "completed"
        },
    )
    .await;
    assert!(completed, "A's extension task never completed in B");

    // The clients' first streams, still open on A, never got a final answer from A: A's
    // runs have been waiting for its lease since shortly after the cut.
    for (_, id, _, sse) in &mut calls {
        let mut from_a = Vec::new();
        let read = async {
            while let Some(e) = sse.next().await {
                from_a.push(e.json());
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
        assert!(
            !from_a.iter().any(|v| v["id"] == *id),
            "A answered {id} while cut off: {from_a:?}"
        );
    }

    // The link heals. A applies B's claims (its waiting runs find their work taken and stop),
    // the freezes are released, A's lease holds again, and all three regions converge.
    link.heal();
    for (_, id, _, sse) in &mut calls {
        let mut from_a = Vec::new();
        let read = async {
            while let Some(e) = sse.next().await {
                from_a.push(e.json());
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        assert!(
            !from_a.iter().any(|v| v["id"] == *id),
            "A's stopped run answered {id}, which B answered: {from_a:?}\nA's log:\n{}",
            std::fs::read_to_string(&a.log).unwrap_or_default()
        );
    }
    let back = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async { lease_holds(&a).await == Some(true) },
    )
    .await;
    assert!(
        back,
        "A's lease never came back: {}",
        regions(&a, false).await
    );
    let converged = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let mut digests = Vec::new();
            for h in [&a, &b, &c] {
                digests.push(regions(h, true).await["digest"]["sha256"].clone());
            }
            digests.iter().all(|d| *d == digests[0])
        },
    )
    .await;
    assert!(converged, "the three regions never converged");
    // Every stream, read whole in every region, holds exactly one final answer: a result.
    for h in [&a, &b, &c] {
        for (client, id, first, _) in &calls {
            let whole = client
                .with_url(&h.url())
                .resume(first.id.as_deref().unwrap())
                .await;
            let mut sse = common::SseReader::new(whole);
            let mut finals = Vec::new();
            let read = async {
                while let Some(e) = sse.next().await {
                    let v = e.json();
                    if v["id"] == *id {
                        finals.push(v);
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
            assert_eq!(finals.len(), 1, "port {}: {finals:?}", h.port);
            assert!(finals[0].get("result").is_some(), "{finals:?}");
        }
        let v = legacy
            .with_url(&h.url())
            .request(400, "tasks/get", json!({"taskId": legacy_task}))
            .await;
        assert_eq!(v["result"]["status"], "completed", "{v}");
    }
    drop((calls, a, b, c, link, rest));
}

/// Three regions, each one nats-server and one node, joined through a hub; region `linked`
/// joins it through a [`Link`] the test can cut. Returned once region `leased`'s node holds
/// its region lease. Fields drop in order: the nodes, the link, then NATS.
struct ThreeRegions {
    a: Haven,
    b: Haven,
    c: Haven,
    link: Link,
    rest: Infra,
}

/// The NATS servers and data directories under [`ThreeRegions`]' nodes.
struct Infra {
    _nats: Vec<NatsCluster>,
    _hub: NatsCluster,
    _dirs: tempfile::TempDir,
}

async fn three_regions(linked: &str, leased: &str) -> ThreeRegions {
    let hub = NatsCluster::start_hub().await;
    let leaf = hub.leaf_port.unwrap();
    let link = Link::start(leaf).await;
    let dirs = tempfile::tempdir().unwrap();
    let mut nats = Vec::new();
    let mut nodes = Vec::new();
    for (name, peers) in [("A", "B,C"), ("B", "A,C"), ("C", "A,B")] {
        let remote = if name == linked { link.port } else { leaf };
        let n = NatsCluster::start_region(name, &[remote]).await;
        let data = dirs.path().join(name);
        nodes.push(node_at(&n, &data, common::free_port(), name, peers).await);
        nats.push(n);
    }
    let [a, b, c]: [Haven; 3] = nodes.try_into().ok().unwrap();
    let holder = match leased {
        "A" => &a,
        "B" => &b,
        _ => &c,
    };
    let held = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async { lease_holds(holder).await == Some(true) },
    )
    .await;
    assert!(held, "{}", regions(holder, false).await);
    ThreeRegions {
        a,
        b,
        c,
        link,
        rest: Infra {
            _nats: nats,
            _hub: hub,
            _dirs: dirs,
        },
    }
}

/// Whether node `h`'s region lease holds (`None`: fewer than three regions).
async fn lease_holds(h: &Haven) -> Option<bool> {
    regions(h, false).await["takeover"]["lease_holds"].as_bool()
}

/// One write of the randomized history: what was written, when it was sent, and when (if
/// ever) its final answer said it was saved.
#[derive(Debug, Clone)]
struct Tried {
    key: String,
    value: String,
    region: &'static str,
    started: Instant,
    acked: Option<Instant>,
}

/// `notes_put` of `key` = `value` on node `url`, in the 2025-11-25 era (a session of its own)
/// or the 2026-07-28 era; whether the final answer said it was saved. Bounded: a call that
/// has no answer within 6 s counts as unknown (it may still land).
async fn try_note_put(
    http: &reqwest::Client,
    url: &str,
    legacy: bool,
    id: i64,
    key: &str,
    value: &str,
) -> bool {
    let args = json!({"name": "notes_put", "arguments": {"name": key, "text": value}});
    let attempt = async {
        let r = if legacy {
            let s = Legacy::try_connect(url).await?;
            s.try_post_raw(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":args}))
                .await
                .ok()?
        } else {
            common::try_stateless(http, url, id, "tools/call", args.clone(), json!({}))
                .await
                .ok()?
        };
        let v = common::try_final(r, id).await?;
        Some(v.get("result").is_some() && v["result"]["isError"] != true)
    };
    tokio::time::timeout(Duration::from_secs(6), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The text of note `key` on node `url` (2026-07-28 era); `Err` when the node did not answer.
async fn try_note_get(
    http: &reqwest::Client,
    url: &str,
    id: i64,
    key: &str,
) -> Result<Option<String>, String> {
    let args = json!({"name": "notes_get", "arguments": {"name": key}});
    let r = common::try_stateless(http, url, id, "tools/call", args, json!({}))
        .await
        .map_err(|e| e.to_string())?;
    let v = common::try_final(r, id).await.ok_or("no answer")?;
    if v["result"]["isError"] == true {
        return Ok(None);
    }
    match v["result"]["content"][0]["text"].as_str() {
        Some(t) => Ok(Some(t.to_owned())),
        None => Err(v.to_string()),
    }
}

/// The randomized checker on real processes: three regions (one nats-server and one Haven
/// node each) joined through a hub, each by a link of the test's own. Every round does one
/// fault at random (cut a region's link, heal links, `kill -9` a region's node or its
/// nats-server and start it again afterwards, or nothing), while concurrent writes of both
/// eras go to random regions: to keys of their own and to a few shared keys. Links stay cut
/// across rounds until a heal, so a region may stay cut off long enough to lose its lease
/// and have its running calls taken over. At the end every link is healed and the regions
/// must converge to one digest, in which every acknowledged write is present: a write to a
/// key of its own exactly, and a shared key holds a value that was written to it and that no
/// acknowledged write sent after its own acknowledgement superseded.
///
/// `HAVEN_REGION_FAULT_SEED` repeats a history's choices (the timing of real processes is not
/// repeatable); `HAVEN_REGION_FAULT_ROUNDS` sets the number of rounds (30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_kills_and_partitions_of_real_regions_lose_no_acknowledged_write() {
    use rand::{Rng, SeedableRng};
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let seed: u64 = std::env::var("HAVEN_REGION_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(haven_state_seed);
    let rounds: usize = std::env::var("HAVEN_REGION_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    eprintln!(
        "region faults: seed {seed}, {rounds} rounds (HAVEN_REGION_FAULT_SEED={seed} repeats the choices)"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    const NAMES: [&str; 3] = ["A", "B", "C"];
    let hub = NatsCluster::start_hub().await;
    let leaf = hub.leaf_port.unwrap();
    let mut links = Vec::new();
    let mut nats = Vec::new();
    for name in NAMES {
        let link = Link::start(leaf).await;
        nats.push(NatsCluster::start_region(name, &[link.port]).await);
        links.push(link);
    }
    let dirs = tempfile::tempdir().unwrap();
    let ports = haven_testkit::free_ports(3);
    let peers = |i: usize| {
        NAMES
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut nodes: Vec<Option<Haven>> = Vec::new();
    for i in 0..3 {
        let data = dirs.path().join(NAMES[i]);
        nodes.push(Some(
            node_at(&nats[i], &data, ports[i], NAMES[i], &peers(i)).await,
        ));
    }
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}/mcp"))
        .collect();
    let leased = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let mut all = true;
            for n in nodes.iter().flatten() {
                all &= lease_holds(n).await == Some(true);
            }
            all
        },
    )
    .await;
    assert!(leased, "the regions never held their leases");

    let http = reqwest::Client::new();
    let mut cut = [false; 3];
    let mut tried: Vec<Tried> = Vec::new();
    let mut faults = Vec::new();
    let mut id = 1000i64;
    for round in 0..rounds {
        let (mut node_down, mut nats_down) = (None, None);
        let r = rng.random_range(0..3usize);
        let fault = match rng.random_range(0..10) {
            0..=2 => {
                links[r].cut();
                cut[r] = true;
                format!("cut {}", NAMES[r])
            }
            3 => {
                for (l, c) in links.iter().zip(cut.iter_mut()) {
                    l.heal();
                    *c = false;
                }
                "heal".to_owned()
            }
            4 | 5 => {
                nodes[r].take().unwrap().kill9();
                node_down = Some(r);
                format!("kill -9 node {}", NAMES[r])
            }
            6 => {
                nats[r].kill9(0);
                nats_down = Some(r);
                format!("kill -9 nats {}", NAMES[r])
            }
            _ => "none".to_owned(),
        };
        faults.push(format!("{round}: {fault} (cut {cut:?})"));
        let mut writes = Vec::new();
        for i in 0..rng.random_range(3..8usize) {
            let mut t = rng.random_range(0..3usize);
            if node_down == Some(t) {
                t = (t + 1) % 3;
            }
            let key = if rng.random_bool(0.5) {
                format!("shared-{}", rng.random_range(0..4))
            } else {
                format!("own-{round}-{i}")
            };
            let value = format!("{round}.{i}@{}", NAMES[t]);
            let legacy = rng.random_bool(0.5);
            id += 1;
            let (http, url) = (http.clone(), urls[t].clone());
            // Spread over the round, so that a round lasts about 2.5 s and a cut of a few
            // rounds outlasts the region's lease.
            let pause = Duration::from_millis(rng.random_range(0..2500));
            writes.push(async move {
                tokio::time::sleep(pause).await;
                let started = Instant::now();
                let ok = try_note_put(&http, &url, legacy, id, &key, &value).await;
                Tried {
                    key,
                    value,
                    region: NAMES[t],
                    started,
                    acked: ok.then(Instant::now),
                }
            });
        }
        tried.extend(futures::future::join_all(writes).await);
        if let Some(r) = node_down {
            let data = dirs.path().join(NAMES[r]);
            nodes[r] = Some(node_at(&nats[r], &data, ports[r], NAMES[r], &peers(r)).await);
        }
        if let Some(r) = nats_down {
            nats[r].restart(0).await;
        }
    }
    for l in &links {
        l.heal();
    }
    let acked = tried.iter().filter(|t| t.acked.is_some()).count();
    let per_region: Vec<String> = NAMES
        .iter()
        .map(|n| {
            let of = |a: bool| {
                tried
                    .iter()
                    .filter(|t| t.region == *n && t.acked.is_some() == a)
                    .count()
            };
            format!("{n}: {} acknowledged, {} unknown", of(true), of(false))
        })
        .collect();
    eprintln!(
        "region faults: {} writes, {acked} acknowledged ({}); faults:\n{}",
        tried.len(),
        per_region.join("; "),
        faults.join("\n")
    );
    assert!(
        acked > tried.len() / 2,
        "seed {seed}: too few writes were acknowledged to check anything"
    );

    // Healed: the three regions converge to one digest.
    let nodes: Vec<Haven> = nodes.into_iter().map(Option::unwrap).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let converged = loop {
        let mut digests = Vec::new();
        for n in &nodes {
            let (_, v) = admin(
                n,
                reqwest::Method::GET,
                "/admin/v1/regions?digest=true",
                None,
            )
            .await;
            digests.push(v["digest"]["sha256"].clone());
        }
        if digests[0].is_string() && digests.iter().all(|d| *d == digests[0]) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(digests);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if let Err(digests) = converged {
        for n in &nodes {
            eprintln!("{}", regions(n, false).await);
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "{} warnings; the last:\n{}",
                lines.len(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        eprintln!("{}", state_differences(&nodes, &NAMES).await);
        panic!("seed {seed}: the regions did not converge: {digests:?}");
    }

    // Every region serves the same value for every key written, and no acknowledged write
    // is missing. A call still unsettled (its answer unknown) may land late: read until the
    // regions agree.
    let mut keys: Vec<&str> = tried.iter().map(|t| t.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut held = std::collections::BTreeMap::new();
    let agreed = 'reads: loop {
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        held.clear();
        for (k, key) in keys.iter().enumerate() {
            let mut seen = Vec::new();
            for (j, url) in urls.iter().enumerate() {
                match try_note_get(&http, url, 100_000 + (k * 3 + j) as i64, key).await {
                    Ok(v) => seen.push(v),
                    Err(_) => continue 'reads,
                }
            }
            if seen.iter().any(|v| *v != seen[0]) {
                continue 'reads;
            }
            held.insert(key.to_string(), seen[0].clone());
        }
        break true;
    };
    assert!(agreed, "seed {seed}: the regions serve different values");
    let margin = Duration::from_millis(20);
    for t in tried.iter().filter(|t| t.acked.is_some()) {
        let now = held[&t.key].as_deref();
        if t.key.starts_with("own-") {
            assert_eq!(
                now,
                Some(t.value.as_str()),
                "seed {seed}: acknowledged {t:?} lost"
            );
            continue;
        }
        let now = now.unwrap_or_else(|| {
            panic!(
                "seed {seed}: shared key {} lost; {t:?} was acknowledged",
                t.key
            )
        });
        let winner = tried
            .iter()
            .find(|w| w.key == t.key && w.value == now)
            .unwrap_or_else(|| panic!("seed {seed}: {} holds {now:?}, which nobody wrote", t.key));
        // The winner was written after t's acknowledgement, or is not itself superseded.
        if let Some(won_at) = winner.acked {
            let later = tried
                .iter()
                .find(|w| w.key == t.key && w.acked.is_some() && w.started > won_at + margin);
            assert!(
                later.is_none(),
                "seed {seed}: {} holds {winner:?}, though {later:?} was sent after it was acknowledged",
                t.key
            );
        }
    }
    let mut takeovers = 0;
    for n in &nodes {
        let v = regions(n, false).await;
        takeovers += v["takeover"]["takeovers"]
            .as_array()
            .map_or(0, |t| t.iter().filter(|x| x["stage"] == "done").count());
    }
    eprintln!(
        "region faults: seed {seed}: {} keys agree in all regions, {acked} acknowledged writes kept; takeovers done (as each region records them): {takeovers}",
        keys.len()
    );
    drop((nodes, links, nats, hub));
}

/// A seed for a history when none is given.
fn haven_state_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// An operator's takeover from a region that does not hear the majority is refused when the
/// lost region's work was started under its lease: the majority may be taking that work over
/// itself. Three regions; C is cut off while B runs such a call, which C holds; `haven region
/// takeover B --confirm-dead` on C says why it refuses and takes nothing, and the call ends
/// once, in B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_takeover_without_the_majority_leaves_leased_work_alone() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let ThreeRegions {
        a,
        b,
        c,
        link,
        rest,
    } = three_regions("C", "B").await;
    let (client, id, first) = streamed_sleep(&b.url(), 10, 6).await;
    let crossed = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { client.with_url(&c.url()).resume(&first).await.status() == 200 },
    )
    .await;
    assert!(crossed, "B's call never reached C");

    link.cut();
    let alone = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let v = regions(&c, false).await;
            v["takeover"]["lease_holds"] == false && v["unreachable"] == json!(["A", "B"])
        },
    )
    .await;
    assert!(alone, "{}", regions(&c, false).await);
    let out = region_cli(&c, &["takeover", "B", "--confirm-dead"]);
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{why}");
    assert!(
        why.contains("does not hear a majority") && why.contains("nothing was taken over"),
        "{why}"
    );

    // B, with the majority, finishes its call: one final answer, a result, in B and (after
    // the heal) in C.
    link.heal();
    for h in [&b, &c] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let finals = loop {
            let finals = finals_after(&client.with_url(&h.url()), &first, id).await;
            if !finals.is_empty() || Instant::now() > deadline {
                break finals;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(finals.len(), 1, "port {}: {finals:?}", h.port);
        assert!(finals[0].get("result").is_some(), "{finals:?}");
    }
    drop((client, a, b, c, link, rest));
}

/// A cut-off region's call that stored its final answer just after the cut (under its lease,
/// but held by no other region) is taken over; the link heals while the claimer's run is
/// still going, so the stopped run's answer arrives in every region before the claimer's.
/// Every region shows the claimer's answer, and only it: the stopped run's is skipped, also
/// in the region that wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_runs_answer_that_arrives_after_the_heal_is_not_the_answer() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let ThreeRegions {
        a,
        b,
        c,
        link,
        rest,
    } = three_regions("A", "A").await;

    // A call without a progress token: its stream holds no event before the final answer.
    let id = 30;
    let client = Legacy::connect(&a.url()).await;
    let started = Instant::now();
    let resp = client
        .post_raw(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":6}}}))
        .await;
    let mut sse = common::SseReader::new(resp);
    let priming = sse.next().await.unwrap().id.unwrap();
    let crossed = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { client.with_url(&b.url()).resume(&priming).await.status() == 200 },
    )
    .await;
    assert!(crossed, "the call never reached B");
    // Cut 1.5 s before the run ends: A stores its answer while its lease still holds.
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(started.elapsed())).await;
    link.cut();
    let stored = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async {
            std::fs::read_to_string(&a.log).is_ok_and(|l| {
                l.contains("the execution's last write waits until a majority of regions holds it")
            })
        },
    )
    .await;
    assert!(stored, "A never stored the call's answer");
    // A survivor takes the call over and runs it again (6 s); the link heals meanwhile.
    let done = wait_until(
        Duration::from_secs(90),
        Duration::from_millis(250),
        || async {
            regions(&b, false).await["takeover"]["takeovers"]
                .as_array()
                .is_some_and(|t| t.iter().any(|x| x["source"] == "A" && x["stage"] == "done"))
        },
    )
    .await;
    assert!(done, "no region took over A's call");
    link.heal();

    // Every region, read whole after the priming event: one final answer, the same event.
    let mut seen = Vec::new();
    for h in [&b, &c, &a] {
        let deadline = Instant::now() + Duration::from_secs(90);
        let finals = loop {
            let mut sse = common::SseReader::new(client.with_url(&h.url()).resume(&priming).await);
            let mut finals = Vec::new();
            let read = async {
                while let Some(e) = sse.next().await {
                    if e.json()["id"] == id {
                        finals.push(e.clone());
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
            if !finals.is_empty() || Instant::now() > deadline {
                break finals;
            }
        };
        assert_eq!(finals.len(), 1, "port {}: {finals:?}", h.port);
        assert!(finals[0].json().get("result").is_some(), "{finals:?}");
        seen.push((finals[0].id.clone(), finals[0].index()));
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    // The answer shown is the claimer's, after the stopped run's (index 1).
    assert_ne!(seen[0].1, Some(1), "{seen:?}");
    drop((sse, client, a, b, c, link, rest));
}

/// Where the states of `nodes`' regions differ: the parts whose digests differ, and in each
/// the keys whose items differ, with every region's version of them.
async fn state_differences(nodes: &[Haven], names: &[&str]) -> String {
    let mut parts = Vec::new();
    for n in nodes {
        let (_, v) = admin(
            n,
            reqwest::Method::GET,
            "/admin/v1/regions?digest=true",
            None,
        )
        .await;
        parts.push(v["digest"]["parts"].clone());
    }
    let mut part_names: Vec<String> = parts
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|p| p.keys().cloned())
        .collect();
    part_names.sort();
    part_names.dedup();
    let mut out = String::new();
    for part in part_names {
        let ds: Vec<&Value> = parts.iter().map(|p| &p[&part]["sha256"]).collect();
        if ds.iter().all(|d| *d == ds[0]) {
            continue;
        }
        out += &format!(
            "part {part} differs: {:?}\n",
            parts.iter().map(|p| &p[&part]["items"]).collect::<Vec<_>>()
        );
        let mut by_key: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        for (i, n) in nodes.iter().enumerate() {
            let path = format!("/admin/v1/regions?items={}", urlencode(&part));
            let (_, v) = admin(n, reqwest::Method::GET, &path, None).await;
            for item in v["items"]["items"].as_array().into_iter().flatten() {
                let key = item["key"].as_str().unwrap_or_default().to_owned();
                let e = by_key
                    .entry(key)
                    .or_insert_with(|| vec![Value::Null; nodes.len()]);
                e[i] = item.clone();
            }
        }
        for (key, items) in by_key {
            if items.iter().all(|i| i["sha256"] == items[0]["sha256"]) {
                continue;
            }
            out += &format!("  {key}:\n");
            for (n, i) in names.iter().zip(&items) {
                out += &format!("    {n}: {i}\n");
            }
        }
    }
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
