//! Issue 14 §5: the status page, rendered by a real headless browser (Debian's `chromium`)
//! from a node of a 3-node region: every node up with its traffic, then a node killed with
//! `kill -9` shown down within seconds; screenshots (phone and desktop widths) are kept with
//! the test logs. Also its sign-in on the admin listener (cookie), its JSON and `haven
//! status` in the terminal.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::cluster::{ONE_REGION_AT_A_TIME, Region, haven_status};
use common::prometheus::Prometheus;
use common::{Legacy, free_port};
use serde_json::{Value, json};

fn chromium() -> PathBuf {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(c).exists() {
            return c.into();
        }
    }
    panic!(
        "chromium is not installed: run scripts/install-tools (Debian package chromium), as the README's test command does"
    );
}

/// Where the screenshots go: `$HAVEN_TEST_LOGS/status-page`, by default
/// `<repo>/target/test-logs/status-page`.
fn shots_dir() -> PathBuf {
    let root = std::env::var_os("HAVEN_TEST_LOGS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-logs"),
        PathBuf::from,
    );
    let dir = root.join("status-page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless chromium with `args` then `url` (bounded to 60 s); its stdout.
fn browser(profile: &std::path::Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--metrics-recording-only",
            "--no-default-browser-check",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// The page's DOM after chromium rendered it.
async fn dom(profile: PathBuf, url: String) -> String {
    tokio::task::spawn_blocking(move || browser(&profile, &["--dump-dom"], &url))
        .await
        .unwrap()
}

/// A screenshot of the page, `width` wide, into `name` in the shots folder.
async fn screenshot(profile: PathBuf, url: String, width: u32, name: &str) -> PathBuf {
    let path = shots_dir().join(name);
    let _ = std::fs::remove_file(&path);
    let arg = format!("--screenshot={}", path.display());
    let size = format!("--window-size={width},1600");
    tokio::task::spawn_blocking(move || browser(&profile, &[&arg, &size], &url))
        .await
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "no screenshot at {}",
        path.display()
    );
    path
}

fn row_state(dom: &str, node: &str) -> Option<String> {
    let at = dom.find(&format!("data-node=\"{node}\" data-state=\""))?;
    let rest = &dom[at + format!("data-node=\"{node}\" data-state=\"").len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_region_and_a_killed_node_down_in_a_real_browser() {
    let _one = ONE_REGION_AT_A_TIME.lock().await;
    let open = haven_testkit::free_ports(3);
    // A Prometheus with Haven's alert rules scrapes every node's open /metrics; the page
    // shows its alerts.
    let prom_port = free_port();
    let env = open
        .iter()
        .map(|p| {
            vec![
                ("HAVEN_METRICS_LISTEN".to_owned(), format!("127.0.0.1:{p}")),
                (
                    "HAVEN_ALERTS_URL".to_owned(),
                    format!("http://127.0.0.1:{prom_port}"),
                ),
            ]
        })
        .collect();
    let mut region = Region::start_custom(&[], env).await;
    let mut targets = String::new();
    for (i, p) in open.iter().enumerate() {
        targets.push_str(&format!(
            "      - targets: ['127.0.0.1:{p}']\n        labels: {{region: r1, node: node{i}}}\n"
        ));
    }
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/prometheus/haven-alerts.yml");
    let prom = Prometheus::start_on(
        prom_port,
        &format!("  - job_name: haven\n    honor_labels: true\n    static_configs:\n{targets}"),
        &[rules],
    )
    .await;
    prom.until("up{job=\"haven\"}", 3, |v| v == 1.0).await;
    let profile = tempfile::tempdir().unwrap();
    let page = format!("http://127.0.0.1:{}/status", open[0]);

    // Traffic on two nodes, in both eras, and a request Haven answers with the client's
    // error (which does not count against availability).
    let l = Legacy::connect(&region.node_url(0)).await;
    for i in 0..20 {
        let v = l
            .call_tool(i, "echo", json!({"text": format!("hello {i}")}))
            .await;
        assert_eq!(v["result"]["isError"], json!(false), "{v}");
    }
    let missing = l.call_tool(99, "no_such_tool", json!({})).await;
    assert!(missing["error"].is_object(), "{missing}");
    let client = reqwest::Client::new();
    for i in 0..10 {
        let r = common::stateless(
            &client,
            &region.node_url(1),
            i,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "x"}}),
            json!({}),
        )
        .await;
        assert_eq!(r.status(), 200);
    }

    // The JSON behind the page: every node up, node0's traffic carried by its heartbeat.
    let node0 = region.nodes[0].as_ref().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let overview = loop {
        let (status, v) =
            common::upstreams::admin(node0, reqwest::Method::GET, "/admin/v1/overview", None).await;
        let r = &v["regions"][0];
        let ready = status == 200
            && r["nodes_up"] == 3
            && r["nodes"].as_array().is_some_and(|n| {
                n.iter()
                    .any(|n| n["stats"]["requests_1h"].as_u64() >= Some(21))
            });
        if ready {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the overview never showed 3 nodes up with node0's traffic: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let r = &overview["regions"][0];
    assert_eq!(r["name"], "r1");
    assert_eq!(r["here"], true);
    assert_eq!(r["role"], "single");
    assert_eq!(r["state"], "up", "{overview:#}");
    // The unknown tool was the client's error: availability stays whole.
    assert_eq!(r["availability_1h"], 1.0, "{overview:#}");
    assert!(r["rate_5m"].as_f64().unwrap() > 0.0);
    assert!(r["p99_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(overview["healthy"], true, "{overview:#}");
    assert_eq!(
        overview["alerts"]["source"],
        format!("http://127.0.0.1:{prom_port}/")
    );
    assert_eq!(overview["alerts"]["error"], Value::Null, "{overview:#}");
    assert_eq!(overview["drill"], Value::Null);

    // The page in a real browser: three nodes up, no script, the sections all there.
    let html = dom(profile.path().into(), page.clone()).await;
    for n in ["node0", "node1", "node2"] {
        assert_eq!(row_state(&html, n).as_deref(), Some("up"), "{n}: {html}");
    }
    for section in [
        "findings",
        "alerts",
        "regions",
        "backup",
        "upstreams",
        "drill",
    ] {
        assert!(
            html.contains(&format!("id=\"{section}\"")),
            "{section}: {html}"
        );
    }
    assert!(
        html.contains("data-region=\"r1\" data-state=\"up\""),
        "{html}"
    );
    assert!(html.contains("data-healthy=\"true\""), "{html}");
    assert!(html.contains("100 %"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    screenshot(
        profile.path().into(),
        page.clone(),
        390,
        "region-up-phone.png",
    )
    .await;
    screenshot(
        profile.path().into(),
        page.clone(),
        1200,
        "region-up-desktop.png",
    )
    .await;

    // node2 killed: the page shows it down within seconds, and says so in its findings.
    region.kill9(2);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let html = loop {
        let html = dom(profile.path().into(), page.clone()).await;
        if row_state(&html, "node2").as_deref() == Some("down") {
            break html;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never showed node2 down: {html}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(row_state(&html, "node0").as_deref(), Some("up"));
    assert!(
        html.contains("data-region=\"r1\" data-state=\"degraded\""),
        "{html}"
    );
    assert!(html.contains("node node2 of region r1 is down"), "{html}");
    // Prometheus saw it too: its HavenNodeDown alert (pending for its first minute, then
    // firing) is on the page.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let html = loop {
        let html = dom(profile.path().into(), page.clone()).await;
        if html.contains("data-alert=\"HavenNodeDown\"") {
            break html;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never showed Prometheus' HavenNodeDown alert: {html}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        html.contains("data-alert=\"HavenNodeDown\" data-state=\"pending\"")
            || html.contains("data-alert=\"HavenNodeDown\" data-state=\"firing\""),
        "{html}"
    );
    let shot = screenshot(
        profile.path().into(),
        page.clone(),
        390,
        "node-down-phone.png",
    )
    .await;
    eprintln!("screenshots kept in {}", shot.parent().unwrap().display());

    // `haven status` shows the same in the terminal.
    let node0 = region.nodes[0].as_ref().unwrap();
    let out = haven_status(node0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Region r1 (here) — degraded (single), nodes up 2"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("node2"))
        .unwrap();
    assert!(line.contains("down"), "{text}");
    assert!(text.contains("node node2 of region r1 is down"), "{text}");
    assert!(text.contains("Last drill: none on record"), "{text}");
    assert!(text.contains("HavenNodeDown"), "{text}");
    drop(prom);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_admin_listener_the_page_takes_the_admin_credentials_through_a_sign_in() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let h = common::Haven::start(&data, free_port(), "default", &[]).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let token = token.trim();
    let base = format!("http://127.0.0.1:{}", h.port);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Without credentials: the sign-in form, and nothing of the status.
    let r = client.get(format!("{base}/status")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("<form method=\"post\" action=\"/status/login\""),
        "{body}"
    );
    assert!(!body.contains("data-node"), "{body}");
    // Not served on the MCP listener's open side either: the admin API shares it here,
    // and /metrics-listen is not set.

    // A wrong token: refused, no cookie; a token that cannot be a cookie: refused plainly.
    for bad in ["wrong-token-wrong-token", "a;b=c", ""] {
        let r = client
            .post(format!("{base}/status/login"))
            .form(&[("token", bad)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
        assert!(r.headers().get("set-cookie").is_none(), "{bad}");
        assert!(r.text().await.unwrap().contains("id=\"refused\""), "{bad}");
    }
    // A sign-in from another site's page is refused by the admin API's Origin check.
    let r = client
        .post(format!("{base}/status/login"))
        .header("origin", "http://evil.example")
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The admin token: a cookie for /status only, then the page.
    let r = client
        .post(format!("{base}/status/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/status");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("haven_status="), "{cookie}");
    for attr in ["Path=/status", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let pair = cookie.split(';').next().unwrap().to_owned();
    let r = client
        .get(format!("{base}/status"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body = r.text().await.unwrap();
    assert!(body.contains("data-node=\"node-"), "{body}");
    assert!(body.contains("No Prometheus given"), "{body}");
    // The cookie opens nothing else of the admin API.
    let r = client
        .get(format!("{base}/admin/v1/overview"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A bearer token works as for any admin route; the JSON is the same model.
    let r = client
        .get(format!("{base}/admin/v1/overview"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["regions"][0]["nodes_up"], 1, "{v:#}");
    // Signing out forgets the cookie.
    let r = client
        .post(format!("{base}/status/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}
