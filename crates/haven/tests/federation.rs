//! Federation of real upstream MCP servers through the real binary: server-everything over
//! stdio and Streamable HTTP and a Python FastMCP server, managed with `haven registry`,
//! `haven secrets` and `haven config`, called by clients of both protocol eras.

mod common;

use std::time::{Duration, Instant};

use common::upstreams::{
    Upstream, admin, children_of, cli, cli_ok, cmdline, everything_stdio_command, require_tools,
};
use common::{Haven, Legacy, SseReader, final_response, free_port, run_ok, stateless};
use reqwest::Method;
use serde_json::{Value, json};

async fn start() -> (tempfile::TempDir, Haven) {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let h = Haven::start(&data, free_port(), "default", &[]).await;
    (dir, h)
}

/// Registers server-everything over stdio as upstream `ev`, with the `registry add` options
/// `options`; the command's output.
fn add_everything_stdio(h: &Haven, options: &[&str]) -> String {
    let mut args = vec!["registry", "add", "ev"];
    args.extend(options);
    args.push("--");
    let cmd = everything_stdio_command();
    args.extend(cmd.iter().map(String::as_str));
    cli_ok(h, &args, None)
}

fn tool_names(list: &Value) -> Vec<String> {
    list["result"]["tools"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

/// Waits (bounded) until a fresh legacy session lists every tool in `want`.
async fn wait_for_tools(h: &Haven, want: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = Legacy::connect(&h.url()).await;
        let names = tool_names(&l.request(1, "tools/list", json!({})).await);
        if want.iter().all(|w| names.iter().any(|n| n == w)) {
            return names;
        }
        assert!(
            Instant::now() < deadline,
            "tools {want:?} did not appear; listed: {names:?}; registry: {}",
            admin(h, Method::GET, "/admin/v1/registry", None).await.1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn text_of(resp: &Value) -> String {
    resp["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text content in {resp}"))
        .to_owned()
}

async fn call_stateless(h: &Haven, id: i64, name: &str, args: Value) -> Value {
    let client = reqwest::Client::new();
    let r = stateless(
        &client,
        &h.url(),
        id,
        "tools/call",
        json!({"name": name, "arguments": args}),
        json!({}),
    )
    .await;
    final_response(r, id).await
}

// Long by design: one setup of real upstreams, exercised through every kind of request in both
// eras.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_upstreams_are_federated_for_both_eras() {
    let (_dir, h) = start().await;
    let ev_http = Upstream::everything_http(None).await;
    let fast = Upstream::fastmcp_http().await;

    // A legacy client with its standalone stream open hears about the new tools.
    let watcher = Legacy::connect(&h.url()).await;
    let stream = watcher.open_standalone().await;
    assert_eq!(stream.status(), 200);
    let mut events = SseReader::new(stream);
    // And a 2026-07-28 client listening for tool list changes.
    let listen = stateless(
        &reqwest::Client::new(),
        &h.url(),
        77,
        "subscriptions/listen",
        json!({"notifications": {"toolsListChanged": true}}),
        json!({}),
    )
    .await;
    assert_eq!(listen.status(), 200);
    let mut listen = SseReader::new(listen);

    let secret = format!("s3cret-{:016x}", rand_u64());
    cli_ok(
        &h,
        &["secrets", "set", "api/token"],
        Some(&format!("{secret}\n")),
    );
    let env = ["--env", "HAVEN_TEST_TOKEN=${secret:api/token}"];
    let out = add_everything_stdio(&h, &env);
    assert!(out.contains("Registered upstream 'ev'"), "{out}");
    cli_ok(
        &h,
        &[
            "registry",
            "add",
            "evhttp",
            "--url",
            &ev_http.url(),
            "--timeout-ms",
            "20000",
        ],
        None,
    );
    cli_ok(
        &h,
        &[
            "registry",
            "add",
            "fast",
            "--url",
            &fast.url(),
            "--header",
            "Authorization: Bearer ${secret:api/token}",
        ],
        None,
    );

    let names = wait_for_tools(&h, &["ev__echo", "evhttp__get-sum", "fast__add", "echo"]).await;
    assert!(names.iter().all(|n| {
        n.len() <= 128
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    }));

    let listed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = events.next().await {
            if e.json()["method"] == "notifications/tools/list_changed" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        listed,
        Ok(true),
        "no tools/list_changed on the standalone stream"
    );
    let heard = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = listen.next().await {
            if e.data.is_empty() {
                continue;
            }
            let v = e.json();
            if v["method"] == "notifications/tools/list_changed" {
                return v["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == 77;
            }
        }
        false
    })
    .await;
    assert_eq!(
        heard,
        Ok(true),
        "no tools/list_changed on subscriptions/listen"
    );

    // Legacy era.
    let l = Legacy::connect(&h.url()).await;
    let r = l.call_tool(2, "ev__echo", json!({"message": "hi"})).await;
    assert_eq!(text_of(&r), "Echo: hi");
    let r = l
        .call_tool(3, "evhttp__get-sum", json!({"a": 2, "b": 40}))
        .await;
    assert!(text_of(&r).contains("42"), "{r}");
    let r = l.call_tool(4, "fast__add", json!({"a": 20, "b": 22})).await;
    assert!(text_of(&r).contains("42"), "{r}");
    // Secret references reach the stdio upstream's environment, expanded.
    let r = l.call_tool(5, "ev__get-env", json!({})).await;
    let env: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(env["HAVEN_TEST_TOKEN"], json!(secret));
    // Nothing of Haven's own environment (HAVEN_LOG is set for every test node) leaks into it.
    let leaked: Vec<&String> = env
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("HAVEN_") && *k != "HAVEN_TEST_TOKEN")
        .collect();
    assert!(leaked.is_empty(), "leaked into the upstream: {leaked:?}");
    // Resources and prompts through the prefix rule.
    let r = l
        .request(6, "resources/read", json!({"uri": "fast+fast://greeting"}))
        .await;
    assert_eq!(
        r["result"]["contents"][0]["text"], "hello from fastmcp",
        "{r}"
    );
    let r = l
        .request(
            7,
            "prompts/get",
            json!({"name": "fast__review", "arguments": {"code": "x = 1"}}),
        )
        .await;
    assert!(
        r["result"]["messages"][0]["content"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("x = 1")),
        "{r}"
    );
    // Haven's own tools are still there, unprefixed.
    let r = l.call_tool(8, "echo", json!({"text": "own"})).await;
    assert!(r.get("result").is_some(), "{r}");

    // 2026-07-28 era.
    let r = call_stateless(&h, 9, "fast__shout", json!({"text": "quiet"})).await;
    assert!(text_of(&r).contains("QUIET"), "{r}");
    let r = call_stateless(&h, 10, "evhttp__echo", json!({"message": "modern"})).await;
    assert_eq!(text_of(&r), "Echo: modern");

    // Status as the CLI shows it.
    let list: Value =
        serde_json::from_str(&cli_ok(&h, &["registry", "list", "--json"], None)).unwrap();
    let ups = list["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 3, "{list}");
    for u in ups {
        assert_eq!(u["status"]["state"], "connected", "{u}");
    }
    let table = cli_ok(&h, &["registry", "list"], None);
    assert!(
        table.contains("NAME") && table.contains("evhttp"),
        "{table}"
    );
    let show = cli_ok(&h, &["registry", "show", "fast"], None);
    assert!(show.contains("${secret:api/token}"), "{show}");
    assert!(
        !show.contains(&secret),
        "a secret value was printed: {show}"
    );

    // Removing the stdio upstream withdraws its tools and ends its process.
    let pid = h.child.id();
    let before: Vec<u32> = children_of(pid)
        .into_iter()
        .filter(|p| cmdline(*p).contains("server-everything"))
        .collect();
    assert_eq!(before.len(), 1, "one stdio upstream process expected");
    cli_ok(&h, &["registry", "remove", "ev"], None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = Legacy::connect(&h.url()).await;
        let names = tool_names(&l.request(1, "tools/list", json!({})).await);
        let alive = std::path::Path::new(&format!("/proc/{}", before[0])).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", before[0]))
                .unwrap_or_default()
                .contains(") Z ");
        if !names.iter().any(|n| n.starts_with("ev__")) && !alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ev still served ({names:?}) or its process alive ({alive})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No secret value in the log or in the stored data.
    let log = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert!(!log.contains(&secret), "the secret value is in the log");
    drop(h);
    for e in walk(&_dir.path().join("data")) {
        let bytes = std::fs::read(&e).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret value is stored in plain text in {}",
            e.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

// Long by design: a table of refused entries, each checked to change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registry_entries_are_refused_and_change_nothing() {
    let (_dir, h) = start().await;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["registry", "add", "bad", "--url", "not a url"],
            "not a valid URL",
        ),
        (
            vec!["registry", "add", "bad", "--url", "ftp://127.0.0.1/x"],
            "http or https",
        ),
        (
            vec![
                "registry",
                "add",
                "Bad_Name",
                "--url",
                "http://127.0.0.1:1/mcp",
            ],
            "must be 1 to 32",
        ),
        (
            vec![
                "registry",
                "add",
                "bad",
                "--url",
                "http://127.0.0.1:1/mcp",
                "--header",
                "X-Key: ${secret:nope}",
            ],
            "unknown secret",
        ),
        (
            vec!["registry", "add", "bad"],
            "say how to reach the upstream",
        ),
    ];
    for (args, want) in &cases {
        let out = cli(&h, args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
    }
    // A duplicate name.
    cli_ok(
        &h,
        &["registry", "add", "one", "--url", "http://127.0.0.1:1/mcp"],
        None,
    );
    let out = cli(
        &h,
        &["registry", "add", "one", "--url", "http://127.0.0.1:2/mcp"],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already registered"));
    // Bad bodies on the API itself.
    for (body, status) in [
        (json!({"name": "x"}), 400),
        (json!({"name": "x", "transport": "carrier-pigeon"}), 400),
        (
            json!({"name": "x", "transport": "http", "url": "http://127.0.0.1:1/mcp", "timeout_ms": 0}),
            400,
        ),
        (
            json!({"name": "one", "transport": "http", "url": "http://127.0.0.1:3/mcp"}),
            409,
        ),
        (
            json!({"name": "y", "transport": "http", "url": "http://127.0.0.1:3/mcp", "headerz": {}}),
            400,
        ),
        (
            json!({"name": "y", "transport": "http", "url": "http://127.0.0.1:3/mcp", "command": "x"}),
            400,
        ),
    ] {
        let (s, v) = admin(&h, Method::POST, "/admin/v1/registry", Some(body.clone())).await;
        assert_eq!(s, status, "{body} -> {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // A body that is JSON but not an object, on PUT (which sets the name from the path):
    // a 400, not a panic that drops the connection (a review finding of the fuzzing work).
    for body in [json!([]), json!(1), json!("one"), json!(null), json!(true)] {
        let (s, v) = admin(
            &h,
            Method::PUT,
            "/admin/v1/registry/two",
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 400, "{body} -> {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    let (s, _) = admin(&h, Method::DELETE, "/admin/v1/registry/nobody", None).await;
    assert_eq!(s, 404);
    // Unauthorized calls change nothing either.
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/admin/v1/registry", h.port))
        .json(&json!({"name": "sneaky", "transport": "http", "url": "http://127.0.0.1:1/mcp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Only the one good entry exists, unchanged.
    let (_, list) = admin(&h, Method::GET, "/admin/v1/registry", None).await;
    let ups = list["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 1, "{list}");
    assert_eq!(ups[0]["url"], "http://127.0.0.1:1/mcp");
    // Bad settings and secrets are refused too.
    let out = cli(&h, &["config", "set", "upstream.timeout_ms", "soon"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a whole number"));
    let out = cli(&h, &["config", "set", "no.such.setting", "1"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("known settings"));
    let out = cli(&h, &["secrets", "set", "bad name"], Some("x\n"));
    assert_eq!(out.status.code(), Some(2));
    let out = cli(
        &h,
        &["secrets", "set", "system/request-state/x"],
        Some("x\n"),
    );
    assert_eq!(out.status.code(), Some(2), "reserved names are refused");
    // Names that would change meaning in a URL path are refused before anything is sent.
    cli_ok(&h, &["secrets", "set", "keep/me"], Some("v\n"));
    for args in [
        vec!["registry", "remove", "../secrets/keep/me"],
        vec!["config", "unset", "../secrets/keep/me"],
        vec!["secrets", "delete", "x/../keep/me"],
        vec!["secrets", "delete", "/keep/me"],
    ] {
        let out = cli(&h, &args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = cli(&h, &["secrets", "set", "x/../keep/me"], Some("other\n"));
    assert_eq!(out.status.code(), Some(2));
    let (s, v) = admin(
        &h,
        Method::PUT,
        "/admin/v1/secrets/a//b",
        Some(json!({"value": "v"})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let listed = cli_ok(&h, &["secrets", "list", "--json"], None);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let keep = listed["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "keep/me")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(keep["version"], 1, "keep/me untouched: {listed}");
    // Several lines on standard input are refused without --multiline.
    let out = cli(&h, &["secrets", "set", "two"], Some("a\nb\n"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--multiline"));
}

// Long by design: each runtime setting changed on a running node and its effect checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_apply_without_restart() {
    let (_dir, h) = start().await;
    let ev_http = Upstream::everything_http(None).await;
    cli_ok(
        &h,
        &["registry", "add", "evhttp", "--url", &ev_http.url()],
        None,
    );
    wait_for_tools(&h, &["evhttp__trigger-long-running-operation"]).await;

    // A shorter upstream timeout applies to the next call: a 10 s operation fails after ~1 s.
    cli_ok(&h, &["config", "set", "upstream.timeout_ms", "1000"], None);
    wait_applied(&h, "upstream.timeout_ms", json!(1000)).await;
    let started = Instant::now();
    let r = call_stateless(
        &h,
        1,
        "evhttp__trigger-long-running-operation",
        json!({"duration": 10, "steps": 2}),
    )
    .await;
    let took = started.elapsed();
    let err = r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(err.contains("1000 ms"), "expected a timeout error, got {r}");
    assert!(took < Duration::from_secs(8), "the call took {took:?}");
    // The upstream keeps serving other calls.
    let r = call_stateless(&h, 2, "evhttp__echo", json!({"message": "still"})).await;
    assert_eq!(text_of(&r), "Echo: still");
    cli_ok(&h, &["config", "unset", "upstream.timeout_ms"], None);

    // A smaller body limit applies to the next request.
    cli_ok(
        &h,
        &["config", "set", "limits.max_body_bytes", "2048"],
        None,
    );
    wait_applied(&h, "limits.max_body_bytes", json!(2048)).await;
    let big = "x".repeat(4096);
    let r = reqwest::Client::new()
        .post(h.url())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(json!({"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad": big}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // A cap on connections per client address applies to the next connection: one address
    // at its cap is answered 503 and closed, the others are served.
    cli_ok(
        &h,
        &["config", "set", "http.max_connections_per_ip", "1"],
        None,
    );
    wait_applied(&h, "http.max_connections_per_ip", json!(1)).await;
    let from = |ip: &str| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(format!("127.0.0.1:{}", h.port).parse().unwrap())
    };
    let get = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
    {
        use tokio::io::AsyncWriteExt;
        let mut held = from("127.0.0.2").await.unwrap();
        held.write_all(get).await.unwrap();
        assert!(first_answer(&mut held).await.starts_with("HTTP/1.1 200"));
        let mut over = from("127.0.0.2").await.unwrap();
        over.write_all(get).await.unwrap();
        let a = first_answer(&mut over).await;
        assert!(
            a.starts_with("HTTP/1.1 503") && a.contains("retry-after: 1"),
            "{a}"
        );
        let mut other = from("127.0.0.3").await.unwrap();
        other.write_all(get).await.unwrap();
        assert!(first_answer(&mut other).await.starts_with("HTTP/1.1 200"));
    }
    cli_ok(
        &h,
        &["config", "unset", "http.max_connections_per_ip"],
        None,
    );
    wait_applied(&h, "http.max_connections_per_ip", json!(0)).await;

    // The built-in catalog can be switched off and on.
    cli_ok(&h, &["config", "set", "catalog", "none"], None);
    wait_applied(&h, "catalog", json!("none")).await;
    let names = tool_names(
        &Legacy::connect(&h.url())
            .await
            .request(1, "tools/list", json!({}))
            .await,
    );
    assert!(!names.iter().any(|n| n == "echo"), "{names:?}");
    assert!(names.iter().any(|n| n == "evhttp__echo"), "{names:?}");
    cli_ok(&h, &["config", "unset", "catalog"], None);
    wait_applied(&h, "catalog", json!("default")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let names = tool_names(
            &Legacy::connect(&h.url())
                .await
                .request(1, "tools/list", json!({}))
                .await,
        );
        if names.iter().any(|n| n == "echo") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "echo did not come back: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // How long a change takes to apply on this node (set acknowledged -> in force).
    let mut took = Vec::new();
    for i in 0..20u64 {
        let value = 20_000 + i;
        let started = Instant::now();
        cli_ok(
            &h,
            &["config", "set", "upstream.timeout_ms", &value.to_string()],
            None,
        );
        wait_applied(&h, "upstream.timeout_ms", json!(value)).await;
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "config change applied (CLI set -> in force, 20 changes): median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    let listed = cli_ok(&h, &["config", "list"], None);
    assert!(
        listed.contains("upstream.timeout_ms") && listed.contains("store"),
        "{listed}"
    );
}

/// Waits (bounded) until the node reports `key` in force with `value`.
/// What the server first sends on `s`.
async fn first_answer(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

async fn wait_applied(h: &Haven, key: &str, value: Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = admin(h, Method::GET, "/admin/v1/config", None).await;
        if v["in_force"]["values"][key] == value {
            return;
        }
        assert!(Instant::now() < deadline, "{key} not applied: {v}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_upstream_that_dies_mid_call_errors_and_is_restarted() {
    let (_dir, h) = start().await;
    add_everything_stdio(&h, &["--timeout-ms", "30000"]);
    wait_for_tools(&h, &["ev__trigger-long-running-operation"]).await;
    let pid = h.child.id();
    let upstream_pid = || {
        children_of(pid)
            .into_iter()
            .find(|p| cmdline(*p).contains("server-everything"))
    };
    let first = upstream_pid().expect("the stdio upstream runs as a child of haven");

    let url = h.url();
    let call = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let r = stateless(
            &client,
            &url,
            1,
            "tools/call",
            json!({"name": "ev__trigger-long-running-operation", "arguments": {"duration": 20, "steps": 4}}),
            json!({}),
        )
        .await;
        final_response(r, 1).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status();
    let r = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .expect("the call did not end after its upstream died")
        .unwrap();
    assert!(r.get("error").is_some(), "expected a JSON-RPC error: {r}");
    println!(
        "call ended {:?} after its upstream was killed",
        started.elapsed()
    );

    // The upstream is restarted and serves again, without operator action.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = call_stateless(&h, 2, "ev__echo", json!({"message": "back"})).await;
        if r.get("result").is_some() && text_of(&r) == "Echo: back" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upstream did not come back: {r}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let second = upstream_pid().expect("a new upstream process");
    assert_ne!(first, second);
    let (_, v) = admin(&h, Method::GET, "/admin/v1/registry/ev", None).await;
    assert!(v["status"]["restarts"].as_u64().unwrap_or(0) >= 1, "{v}");

    // A node that stops (SIGTERM) ends its stdio upstreams too.
    let mut h = h;
    assert!(h.terminate(Duration::from_secs(30)).await, "haven exited");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{second}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the stdio upstream outlived haven"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// Long by design: one rotation story: new key, rotate, retire, restart, each checked on every
// secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_key_encryption_key_keeps_every_secret() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keys = dir.path().join("secrets.keys");
    let port = free_port();
    let key_arg = keys.display().to_string();
    // The operator creates the key file first.
    let new_key = ["secrets", "new-key", "--key-file", &key_arg];
    run_ok(std::process::Command::new(env!("CARGO_BIN_EXE_haven")).args(new_key));
    let old_kid = std::fs::read_to_string(&keys)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    let h = Haven::start(&data, port, "default", &["--secrets-key-file", &key_arg]).await;
    for i in 0..5 {
        cli_ok(
            &h,
            &["secrets", "set", &format!("app/s{i}")],
            Some(&format!("value-{i}\n")),
        );
    }
    let listed = cli_ok(&h, &["secrets", "list"], None);
    assert!(
        listed.contains("app/s4") && !listed.contains("value-"),
        "{listed}"
    );

    // A new key, then rotation while the node serves.
    let new_key = ["secrets", "new-key", "--key-file", &key_arg];
    run_ok(std::process::Command::new(env!("CARGO_BIN_EXE_haven")).args(new_key));
    let rotated = cli_ok(&h, &["secrets", "rotate-key"], None);
    assert!(rotated.contains("older keys can be removed"), "{rotated}");
    let (_, k) = admin(&h, Method::GET, "/admin/v1/keys", None).await;
    let primary = k["kek"]["primary"].as_str().unwrap().to_owned();
    assert_ne!(primary, old_kid);
    assert!(
        k["kek"]["usage"].get(&old_kid).is_none_or(|n| n == 0),
        "{k}"
    );

    // The old key is retired: remove it from the file and restart with the new key only.
    let text = std::fs::read_to_string(&keys).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(&format!("{old_kid} ")))
        .collect();
    std::fs::write(&keys, kept.join("\n") + "\n").unwrap();
    drop(h);
    let h = Haven::start(&data, port, "default", &["--secrets-key-file", &key_arg]).await;
    // Every secret still decrypts: an upstream that references one starts with its value.
    add_everything_stdio(&h, &["--env", "HAVEN_TEST_S3=${secret:app/s3}"]);
    wait_for_tools(&h, &["ev__get-env"]).await;
    let r = call_stateless(&h, 1, "ev__get-env", json!({})).await;
    let env: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(env["HAVEN_TEST_S3"], "value-3");
    let keys_out = cli_ok(&h, &["secrets", "keys"], None);
    assert!(keys_out.contains(&primary), "{keys_out}");
    // SECRETS counts what `secrets list` shows; Haven's own are a column of their own.
    let listed_now = cli_ok(&h, &["secrets", "list"], None);
    let users = listed_now
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    let (_, k) = admin(&h, Method::GET, "/admin/v1/keys", None).await;
    let owned = &k["kek"]["by_owner"][&primary];
    assert_eq!(owned["user"], users, "{k}\n{listed_now}");
    let row = keys_out.lines().find(|l| l.starts_with(&primary)).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], users.to_string(), "{keys_out}");
    assert_eq!(
        cols[2],
        owned["haven"].as_array().unwrap().len().to_string(),
        "{keys_out}"
    );
    assert!(
        keys_out.contains("HAVEN'S OWN: ") && keys_out.contains("request-state signing key"),
        "{keys_out}"
    );

    // Request-state keys: rotate-key started a new signing key; the older one can be retired,
    // the signing one cannot.
    let (_, k) = admin(&h, Method::GET, "/admin/v1/keys", None).await;
    let signing = k["request_state"]["signing"].as_str().unwrap().to_owned();
    let older: Vec<String> = k["request_state"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["retired"] != true)
        .map(|r| r["kid"].as_str().unwrap().to_owned())
        .filter(|kid| *kid != signing)
        .collect();
    assert!(!older.is_empty(), "{k}");
    let out = cli(&h, &["secrets", "retire-key", &signing], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signs now"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kid in &older {
        cli_ok(&h, &["secrets", "retire-key", kid], None);
    }
    let out = cli(&h, &["secrets", "retire-key", &signing], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only live key"));
    let out = cli(&h, &["secrets", "retire-key", "no-such-key"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

/// Runs `haven serve` expecting it to exit at once; kills it after 30 s (so a node that
/// wrongly starts fails the test instead of hanging it).
fn serve_until_exit(data: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data",
        ])
        .arg(data)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("haven serve {extra:?} kept running; it should have refused to start");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_key_file_of_its_secrets_refuses_to_start() {
    let (dir, h) = start().await;
    cli_ok(&h, &["secrets", "set", "db/password"], Some("hunter2\n"));
    drop(h);
    let data = dir.path().join("data");
    let kept = dir.path().join("kept.keys");
    std::fs::rename(data.join("secrets.keys"), &kept).unwrap();
    let out = serve_until_exit(&data, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("holds secrets") && err.contains("db/password"),
        "{err}"
    );
    assert!(!data.join("secrets.keys").exists(), "no new key was made");

    // Nor with another deployment's key file.
    let other = dir.path().join("other.keys");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["secrets", "new-key", "--key-file"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = serve_until_exit(&data, &["--secrets-key-file", &other.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("db/password"), "{err}");

    // Nor with a key of the right id but other material.
    let text = std::fs::read_to_string(&kept).unwrap();
    let kid = text
        .lines()
        .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    let forged = dir.path().join("forged.keys");
    // 32 bytes of 'A', base64.
    common::write_key_file(
        &forged,
        format!("{kid} QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n"),
    );
    let out = serve_until_exit(
        &data,
        &["--secrets-key-file", &forged.display().to_string()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not open") && err.contains("db/password"),
        "{err}"
    );

    // With the kept key file it starts.
    let h = Haven::start(
        &data,
        free_port(),
        "default",
        &["--secrets-key-file", &kept.display().to_string()],
    )
    .await;
    drop(h);
}

/// Asserts that `resp` is a JSON-RPC error with `data: {upstream: "leaky", reason, status}`
/// and nothing of the upstream's answer, its URL or Haven's internals.
fn assert_upstream_error(what: &str, resp: &Value, reason: &str, status: u16, leaks: &[&str]) {
    let e = &resp["error"];
    assert_eq!(
        e["data"],
        json!({"upstream": "leaky", "reason": reason, "status": status}),
        "{what}: {resp}"
    );
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("upstream 'leaky' ")),
        "{what}: {resp}"
    );
    let text = e.to_string();
    for bad in leaks.iter().chain(&[
        "api_key",
        "?",
        "unauthorized: you sent",
        "::",
        "Error {",
        "reqwest",
        "Transport",
        "127.0.0.1",
    ]) {
        assert!(
            !text.contains(bad),
            "{what}: '{bad}' reached the client: {resp}"
        );
    }
}

// Long by design: one leaky upstream, through each kind of request in both eras, then what
// operators see, then the refused credentials combination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_reach_clients_of_both_eras_without_details() {
    const SECRET: &str = "s3cr3t-tok-0815";
    const QUERY: &str = "QUERYSECRET-4711";
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let leaky = haven_testkit::LeakyUpstream::start().await;
    // Every failing call below reaches the upstream (its breaker stays closed).
    cli_ok(
        &h,
        &["config", "set", "upstream.breaker_failures", "100"],
        None,
    );
    wait_applied(&h, "upstream.breaker_failures", json!(100)).await;
    cli_ok(&h, &["secrets", "set", "leaky/token"], Some(SECRET));
    let url = leaky.url(&format!("/mcp?api_key={QUERY}"));
    cli_ok(
        &h,
        &[
            "registry",
            "add",
            "leaky",
            "--url",
            &url,
            "--header",
            "Authorization: Bearer ${secret:leaky/token}",
        ],
        None,
    );
    wait_for_tools(&h, &["leaky__ok", "leaky__leaky"]).await;
    let l = Legacy::connect(&h.url()).await;
    assert_eq!(
        text_of(&l.call_tool(1, "leaky__ok", json!({})).await),
        "fine"
    );
    // The upstream got the secret, so it has something to echo.
    assert!(
        leaky
            .authorizations()
            .iter()
            .any(|a| a == &[format!("Bearer {SECRET}")]),
        "{:?}",
        leaky.authorizations()
    );

    let leaks = [SECRET, QUERY];
    let cases = [
        (
            "tools/call",
            json!({"name": "leaky__leaky", "arguments": {}}),
            "auth_rejected",
            401,
        ),
        (
            "tools/call",
            json!({"name": "leaky__leaky_500", "arguments": {}}),
            "http_status",
            500,
        ),
        (
            "resources/read",
            json!({"uri": "leaky+leak://doc"}),
            "auth_rejected",
            401,
        ),
        (
            "prompts/get",
            json!({"name": "leaky__leaky_prompt"}),
            "auth_rejected",
            403,
        ),
    ];
    let client = reqwest::Client::new();
    for (i, (method, params, reason, status)) in cases.iter().enumerate() {
        let id = 10 + i as i64;
        let legacy = l.request(id, method, params.clone()).await;
        assert_upstream_error(
            &format!("legacy {method} {params}"),
            &legacy,
            reason,
            *status,
            &leaks,
        );
        let r = stateless(&client, &h.url(), id, method, params.clone(), json!({})).await;
        let modern = final_response(r, id).await;
        assert_upstream_error(
            &format!("2026-07-28 {method} {params}"),
            &modern,
            reason,
            *status,
            &leaks,
        );
    }

    // Operators: the log and the admin API have the details, redacted.
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("upstream call failed")
            && l.contains("leaky")
            && l.contains("HTTP 401")
            && l.contains("authorization: [redacted]")
            && l.contains("/mcp?[redacted]")),
        "no redacted details in the log:\n{log}"
    );
    for bad in leaks {
        assert!(!log.contains(bad), "'{bad}' is in the log:\n{log}");
    }
    let (s, v) = admin(&h, Method::GET, "/admin/v1/registry/leaky", None).await;
    assert_eq!(s, 200, "{v}");
    let st = &v["status"];
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP 403")),
        "{v}"
    );
    assert_eq!(st["last_error_reason"], "auth_rejected", "{v}");
    assert_eq!(v["url"], leaky.url("/mcp?[redacted]"), "{v}");
    let listed = cli_ok(&h, &["registry", "list"], None);
    let shown = cli_ok(&h, &["registry", "show", "leaky"], None);
    let (_, all) = admin(&h, Method::GET, "/admin/v1/registry", None).await;
    for bad in leaks {
        for (what, text) in [
            ("show", v.to_string()),
            ("list", all.to_string()),
            ("cli list", listed.clone()),
            ("cli show", shown.clone()),
        ] {
            assert!(!text.contains(bad), "{what}: '{bad}' shown: {text}");
        }
    }

    // Its credentials are revoked (the entry now points at a route that refuses everything,
    // the handshake included; rmcp's own log lines of that would quote the echo unredacted):
    // its listed tools stay, and clients get the reason of its last connection attempt.
    cli_ok(
        &h,
        &[
            "registry",
            "add",
            "leaky",
            "--replace",
            "--url",
            &leaky.url(&format!("/deny?api_key={QUERY}")),
            "--header",
            "Authorization: Bearer ${secret:leaky/token}",
        ],
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let denied = loop {
        let (_, v) = admin(&h, Method::GET, "/admin/v1/registry/leaky", None).await;
        if v["status"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("handshake"))
        {
            break v;
        }
        assert!(Instant::now() < deadline, "the handshake never failed: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        denied["status"]["last_error_reason"], "auth_rejected",
        "{denied}"
    );
    let detail = denied["status"]["last_error"].as_str().unwrap_or_default();
    assert!(
        detail.contains("HTTP 401") && detail.contains("authorization: [redacted]"),
        "{denied}"
    );
    for (i, era) in ["legacy", "2026-07-28"].iter().enumerate() {
        let id = 30 + i as i64;
        let params = json!({"name": "leaky__ok", "arguments": {}});
        let r = if i == 0 {
            l.request(id, "tools/call", params).await
        } else {
            let r = stateless(&client, &h.url(), id, "tools/call", params, json!({})).await;
            final_response(r, id).await
        };
        assert_upstream_error(era, &r, "auth_rejected", 401, &leaks);
    }
    let log = std::fs::read_to_string(&h.log).unwrap();
    for bad in leaks {
        assert!(!log.contains(bad), "'{bad}' is in the log:\n{log}");
    }
    let (_, all) = admin(&h, Method::GET, "/admin/v1/registry", None).await;

    // URL credentials and an Authorization header together are refused (CLI, API: add and
    // replace), saying why, without echoing the password; nothing is stored.
    let entries = |all: &Value| -> Vec<Value> {
        all["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| json!([u["name"], u["url"], u["headers"]]))
            .collect()
    };
    let before = entries(&all);
    let combo = leaky
        .url("/mcp")
        .replace("http://", "http://alice:pa55word@");
    let out = cli(
        &h,
        &[
            "registry",
            "add",
            "combo",
            "--url",
            &combo,
            "--header",
            "Authorization: Bearer ${secret:leaky/token}",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("carries credentials"), "{err}");
    assert!(!err.contains("pa55word"), "{err}");
    let body = json!({
        "name": "combo", "transport": "http", "url": combo,
        "headers": {"authorization": "Basic Zm9vOmJhcg=="},
    });
    let (s, v) = admin(&h, Method::POST, "/admin/v1/registry", Some(body.clone())).await;
    assert_eq!(s, 400, "{v}");
    assert!(!v.to_string().contains("pa55word"), "{v}");
    let (s, v) = admin(&h, Method::PUT, "/admin/v1/registry/leaky", Some(body)).await;
    assert_eq!(s, 400, "{v}");
    let (_, all) = admin(&h, Method::GET, "/admin/v1/registry", None).await;
    assert_eq!(entries(&all), before, "{all}");

    leaky.stop().await;
}

/// A minimal MCP server over stdio in Python (no packages needed): one tool, `hello`. It
/// writes `stderr_lines` to its stderr and sleeps `delay_s` seconds before reading anything.
fn python_upstream(dir: &std::path::Path, name: &str, stderr_lines: &str, delay_s: u32) -> String {
    let script = dir.join(format!("{name}.py"));
    let body = format!(
        r#"import json, sys, time
sys.stderr.write({stderr_lines:?})
sys.stderr.flush()
time.sleep({delay_s})
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    m = msg.get("method")
    if m == "initialize":
        result = {{"protocolVersion": msg["params"]["protocolVersion"],
                  "capabilities": {{"tools": {{}}}},
                  "serverInfo": {{"name": "py", "version": "1"}}}}
    elif m == "tools/list":
        result = {{"tools": [{{"name": "hello", "inputSchema": {{"type": "object"}}}}]}}
    elif m == "tools/call":
        result = {{"content": [{{"type": "text", "text": "hello"}}]}}
    elif m in ("prompts/list", "resources/list", "resources/templates/list"):
        key = {{"prompts/list": "prompts", "resources/list": "resources",
               "resources/templates/list": "resourceTemplates"}}[m]
        result = {{key: []}}
    else:
        result = {{}}
    sys.stdout.write(json.dumps({{"jsonrpc": "2.0", "id": msg["id"], "result": result}}) + "\n")
    sys.stdout.flush()
"#
    );
    std::fs::write(&script, body).unwrap();
    script.to_str().unwrap().to_owned()
}

/// Waits (bounded) until `check` holds of upstream `name`'s admin entry; the entry.
async fn wait_upstream(h: &Haven, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = admin(h, Method::GET, &format!("/admin/v1/registry/{name}"), None).await;
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name}: {what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stdio upstream that fails to start: what it wrote to stderr is shown by `haven registry
/// show` and `list` and the admin API, and every respawn counts as a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stdio_upstreams_stderr_and_restarts_are_shown() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    h.set_setting("upstream.restart_max_backoff_ms", json!(100))
        .await;
    let script = dir.path().join("exits.py");
    std::fs::write(
        &script,
        "import sys\nsys.stderr.write('npm warn deprecated thing\\nError: Cannot find module x\\n')\nsys.exit(1)\n",
    )
    .unwrap();
    cli_ok(
        &h,
        &[
            "registry",
            "add",
            "broken",
            "--",
            "python3",
            script.to_str().unwrap(),
        ],
        None,
    );
    let v = wait_upstream(&h, "broken", "not restarted 3 times", |v| {
        v["status"]["restarts"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    let stderr: Vec<&str> = v["status"]["stderr"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(stderr.contains(&"Error: Cannot find module x"), "{v}");
    // Bounded: 20 lines at most, however many restarts.
    wait_upstream(&h, "broken", "not restarted 15 times", |v| {
        v["status"]["restarts"].as_u64().unwrap_or(0) >= 15
    })
    .await;
    let (_, v) = admin(&h, Method::GET, "/admin/v1/registry/broken", None).await;
    assert_eq!(v["status"]["stderr"].as_array().unwrap().len(), 20, "{v}");

    let show = cli_ok(&h, &["registry", "show", "broken"], None);
    assert!(show.contains("stderr (last 20 lines):"), "{show}");
    assert!(show.contains("    Error: Cannot find module x"), "{show}");
    let restarts: u64 = show
        .lines()
        .find_map(|l| l.trim().strip_prefix("restarts:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("restarts in registry show");
    assert!(restarts >= 15, "{show}");
    let list = cli_ok(&h, &["registry", "list"], None);
    assert!(
        list.contains("broken stderr (last line") && list.contains("Error: Cannot find module x"),
        "{list}"
    );
}

/// A stdio upstream whose first start is slower than `upstream.connect_timeout_ms` (as `npx
/// -y` on a cold cache) comes up within `upstream.first_start_timeout_ms`, at its first
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_start_within_its_allowance_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    h.set_setting("upstream.connect_timeout_ms", json!(500))
        .await;
    h.set_setting("upstream.first_start_timeout_ms", json!(30000))
        .await;
    let script = python_upstream(dir.path(), "slow", "fetching packages\n", 3);
    cli_ok(
        &h,
        &["registry", "add", "slow", "--", "python3", &script],
        None,
    );
    let v = wait_upstream(&h, "slow", "not connected", |v| {
        v["status"]["state"] == "connected"
    })
    .await;
    assert_eq!(v["status"]["restarts"], 0, "{v}");
    assert_eq!(v["status"]["stderr"], json!(["fetching packages"]), "{v}");
    wait_for_tools(&h, &["slow__hello"]).await;
}
