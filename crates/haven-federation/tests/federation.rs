//! The federation against real upstreams on 127.0.0.1: an rmcp server over Streamable HTTP in
//! this process and the `haven-federation-test-upstream` binary over stdio. Every test stops
//! what it started (pool, servers, child processes); every wait is bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use haven_catalogs::DefaultCatalog;
use haven_control::config::UpstreamSettings;
use haven_control::registry::{Piece, Registry, Transport, UpstreamSpec, parse_template};
use haven_federation::testing::{HttpUpstream, Served, long_tool_name};
use haven_federation::{
    FederatedCatalog, LISTS_NS, REQUEST_CANCELLED, SecretResolver, UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE, UpstreamLists, UpstreamState, UpstreamStatus, Upstreams,
};
use haven_mcp::catalog::{Caller, Catalog, Round, Step};
use haven_mcp::context::{ANNOUNCE_NS, Era, Item, RequestContext};
use haven_state::Store;
use rmcp::model::{
    ArgumentInfo, CallToolResult, CompleteRequestParams, ErrorData, GetPromptResult, JsonObject,
    NumberOrString, ProgressToken, Reference, ResourceContents,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const STDIO_BIN: &str = env!("CARGO_BIN_EXE_haven-federation-test-upstream");
const SECRET_VALUE: &str = "s3cr3t-value-xyz";

/// Resolves `${secret:NAME}` from a fixed map.
struct MapSecrets(BTreeMap<String, String>);

#[async_trait]
impl SecretResolver for MapSecrets {
    async fn expand(&self, template: &str) -> Result<String, String> {
        let mut out = String::new();
        for p in parse_template(template).map_err(|e| e.to_string())? {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Secret(n) => out.push_str(
                    self.0
                        .get(n)
                        .ok_or_else(|| format!("unknown secret '{n}'"))?,
                ),
            }
        }
        Ok(out)
    }
}

struct Node {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    settings: watch::Sender<UpstreamSettings>,
    upstreams: Upstreams,
    catalog: FederatedCatalog,
}

fn settings() -> UpstreamSettings {
    UpstreamSettings {
        timeout_ms: 5_000,
        breaker_failures: 3,
        breaker_cooldown_ms: 1_000,
        restart_max_backoff_ms: 1_000,
        connect_timeout_ms: 3_000,
        first_start_timeout_ms: 3_000,
    }
}

fn node(settings: UpstreamSettings) -> Node {
    // RUST_LOG=haven_federation=debug shows what the pool does.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = haven_testkit::redb_store(dir.path());
    let (tx, rx) = watch::channel(settings);
    let secrets = MapSecrets(BTreeMap::from([(
        "tok".to_string(),
        SECRET_VALUE.to_string(),
    )]));
    let upstreams = Upstreams::start(store.clone(), Arc::new(secrets), rx);
    let catalog = upstreams.catalog(Arc::new(DefaultCatalog::new()));
    Node {
        _dir: dir,
        store,
        settings: tx,
        upstreams,
        catalog,
    }
}

impl Node {
    async fn register(&self, spec: UpstreamSpec) {
        let known = spec.secret_references();
        Registry::new(self.store.clone())
            .add(&spec, &known, true)
            .await
            .unwrap();
    }

    fn status(&self, name: &str) -> Option<UpstreamStatus> {
        self.upstreams.status().into_iter().find(|s| s.name == name)
    }

    /// Waits (at most `limit`) until `name` is in `state`.
    async fn wait_state(
        &self,
        name: &str,
        state: UpstreamState,
        limit: Duration,
    ) -> UpstreamStatus {
        let waited = poll(Duration::from_millis(20), async || {
            self.status(name).filter(|s| s.state == state)
        });
        match tokio::time::timeout(limit, waited).await {
            Ok(s) => s,
            Err(_) => panic!(
                "{name} did not become {state:?} within {limit:?}: {:?}",
                self.status(name)
            ),
        }
    }

    async fn tool_names(&self) -> Vec<String> {
        self.catalog
            .tools(&ctx(&self.store))
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect()
    }

    async fn call(&self, name: &str, args: Value) -> Result<CallToolResult, ErrorData> {
        self.call_with(&ctx(&self.store), name, args).await
    }

    async fn call_with(
        &self,
        ctx: &RequestContext,
        name: &str,
        args: Value,
    ) -> Result<CallToolResult, ErrorData> {
        let Value::Object(args) = args else { panic!() };
        match self
            .catalog
            .call_tool(ctx, name, args, Round::default())
            .await?
        {
            Step::Done(r) => Ok(r),
            Step::NeedInput { .. } => panic!("unexpected input request"),
        }
    }

    /// Calls `name` until its breaker lets the call through (until then each call is refused
    /// as "circuit breaker open" without reaching the upstream); the outcome of that call.
    async fn call_after_cooldown(
        &self,
        name: &str,
        args: Value,
    ) -> Result<CallToolResult, ErrorData> {
        let every = Duration::from_millis(20);
        retry(
            Duration::from_secs(5),
            every,
            "the breaker stayed open",
            async || match self.call(name, args.clone()).await {
                Err(e) if e.message.contains("circuit breaker open") => None,
                outcome => Some(outcome),
            },
        )
        .await
    }

    /// Reads the text resource `uri`: the URI it answers with and its text.
    async fn read_text(&self, uri: &str) -> (String, String) {
        let Step::Done(read) = self
            .catalog
            .read_resource(&ctx(&self.store), uri, Round::default())
            .await
            .unwrap()
        else {
            panic!("{uri}: no final result")
        };
        let ResourceContents::TextResourceContents { uri, text, .. } = &read.contents[0] else {
            panic!("{read:?}")
        };
        (uri.clone(), text.clone())
    }

    /// Renders the prompt `local__greet` for `name`.
    async fn greet_prompt(&self, name: &str) -> GetPromptResult {
        let mut args = JsonObject::new();
        args.insert("name".into(), json!(name));
        let c = ctx(&self.store);
        let call = self
            .catalog
            .get_prompt(&c, "local__greet", args, Round::default());
        let Step::Done(p) = call.await.unwrap() else {
            panic!("local__greet: no final result")
        };
        p
    }

    async fn record(&self, upstream: &str) -> Option<(u64, UpstreamLists)> {
        let r = self.store.get(LISTS_NS, upstream).await.unwrap()?;
        Some((r.revision, serde_json::from_slice(r.value()).unwrap()))
    }

    async fn announcement(&self, key: &str) -> Option<u64> {
        self.store
            .get(ANNOUNCE_NS, key)
            .await
            .unwrap()
            .map(|r| r.revision)
    }

    async fn stop(self) {
        self.upstreams.shutdown().await;
        drop(self.settings);
    }
}

fn ctx(store: &Arc<dyn Store>) -> RequestContext {
    ctx_with(store, None, None, CancellationToken::new())
}

/// A stateless-era request context with a progress token, an outlet and a cancellation.
fn ctx_with(
    store: &Arc<dyn Store>,
    token: Option<ProgressToken>,
    out: Option<mpsc::UnboundedSender<Item>>,
    cancel: CancellationToken,
) -> RequestContext {
    RequestContext::new(
        store.clone(),
        Era::Stateless {
            protocol_version: "2026-07-28".into(),
        },
        Caller::default(),
        token,
        out,
        cancel,
    )
}

fn http_spec(name: &str, url: &str) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        transport: Transport::Http {
            url: url.into(),
            headers: BTreeMap::from([("X-Token".to_string(), "${secret:tok}".to_string())]),
        },
        timeout_ms: None,
        disabled: false,
        description: None,
    }
}

fn stdio_spec(name: &str, label: &str) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        transport: Transport::Stdio {
            command: STDIO_BIN.into(),
            args: vec![label.into()],
            env: BTreeMap::from([(
                "HAVEN_TEST_TOKEN".to_string(),
                "Bearer ${secret:tok}".to_string(),
            )]),
            cwd: None,
        },
        timeout_ms: None,
        disabled: false,
        description: None,
    }
}

fn text_of(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("")
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Tries `attempt` every `every` until it gives a value; fails saying `what` after `limit`.
/// A hand-written upstream: `router` served on 127.0.0.1 until it is stopped.
async fn serve_local(router: axum::Router) -> Served {
    Served::start(router, local(), CancellationToken::new())
        .await
        .unwrap()
}

async fn retry<T>(
    limit: Duration,
    every: Duration,
    what: &str,
    attempt: impl AsyncFnMut() -> Option<T>,
) -> T {
    tokio::time::timeout(limit, poll(every, attempt))
        .await
        .unwrap_or_else(|_| panic!("{what} (waited {limit:?})"))
}

/// Tries `attempt` every `every` until it gives a value (the caller bounds the wait).
async fn poll<T>(every: Duration, mut attempt: impl AsyncFnMut() -> Option<T>) -> T {
    loop {
        if let Some(v) = attempt().await {
            return v;
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `done` every 20 ms until it holds; fails saying `what` after `limit`.
async fn wait_until(limit: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    retry(limit, Duration::from_millis(20), what, async || {
        done().await.then_some(())
    })
    .await
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

const CONNECT: Duration = Duration::from_secs(15);

/// A stdio upstream `local` (labelled `label`) on a new node, connected; its child's pid.
async fn stdio_node(label: &str) -> (Node, u32) {
    let n = node(settings());
    n.register(stdio_spec("local", label)).await;
    let st = n
        .wait_state("local", UpstreamState::Connected, CONNECT)
        .await;
    (n, st.pid.unwrap())
}

/// An HTTP upstream `web` (with its own call timeout, if given) on a new node, connected.
async fn web_node(settings: UpstreamSettings, timeout_ms: Option<u64>) -> (HttpUpstream, Node) {
    let web = HttpUpstream::start("web", local()).await.unwrap();
    let n = node(settings);
    let mut spec = http_spec("web", &web.url);
    spec.timeout_ms = timeout_ms;
    n.register(spec).await;
    n.wait_state("web", UpstreamState::Connected, CONNECT).await;
    (web, n)
}

// Long by design: one pool with two upstreams, through every kind of call that routes by prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_served_namespaced_and_calls_route() {
    let web = HttpUpstream::start("web", local()).await.unwrap();
    let n = node(settings());
    n.register(http_spec("web", &web.url)).await;
    n.register(stdio_spec("local", "loc")).await;
    n.wait_state("web", UpstreamState::Connected, CONNECT).await;
    let st = n
        .wait_state("local", UpstreamState::Connected, CONNECT)
        .await;
    assert_eq!(st.transport, "stdio");
    assert_eq!(st.tools, 8, "{st:?}");
    assert_eq!((st.prompts, st.resources, st.resource_templates), (1, 1, 1));

    // Tools of both upstreams, namespaced, next to Haven's own; invalid names are skipped.
    let tools = n.tool_names().await;
    for t in [
        "echo",
        "web__add",
        "web__slow",
        "local__add",
        "local__getenv",
    ] {
        assert!(tools.contains(&t.to_string()), "{t} missing from {tools:?}");
    }
    assert!(
        !tools
            .iter()
            .any(|t| t.contains("bad name") || t.contains(&long_tool_name()))
    );

    // Calls route with their arguments intact; the base catalog still answers.
    let r = n.call("web__add", json!({"a": 2, "b": 3})).await.unwrap();
    assert_eq!(text_of(&r), "5");
    let r = n
        .call("local__add", json!({"a": 1.5, "b": 2}))
        .await
        .unwrap();
    assert_eq!(text_of(&r), "3.5");
    let r = n.call("echo", json!({"text": "hi"})).await.unwrap();
    assert_eq!(text_of(&r), "hi");
    // The upstream's own JSON-RPC error reaches the client.
    let e = n.call("web__nope", json!({})).await.unwrap_err();
    assert!(e.message.contains("Unknown tool: nope"), "{e:?}");
    // Secrets in the environment of a stdio upstream are expanded.
    let r = n
        .call("local__getenv", json!({"name": "HAVEN_TEST_TOKEN"}))
        .await
        .unwrap();
    assert_eq!(text_of(&r), format!("Bearer {SECRET_VALUE}"));

    // Resources, templates and prompts through the prefix.
    let c = ctx(&n.store);
    let resources = n.catalog.resources(&c).await.unwrap();
    let uris: Vec<&str> = resources.iter().map(|r| r.uri.as_str()).collect();
    assert!(uris.contains(&"web+test://static/hello"), "{uris:?}");
    assert!(uris.contains(&"local+test://static/hello"), "{uris:?}");
    let templates = n.catalog.resource_templates(&c).await.unwrap();
    assert!(
        templates
            .iter()
            .any(|t| t.uri_template == "local+test://items/{id}")
    );
    assert_eq!(
        n.read_text("web+test://static/hello").await,
        (
            "web+test://static/hello".to_owned(),
            "hello from web".to_owned()
        )
    );
    assert_eq!(n.read_text("local+test://items/7").await.1, "item 7");
    let prompts = n.catalog.prompts(&c).await.unwrap();
    assert!(prompts.iter().any(|p| p.name == "web__greet"));
    let p = n.greet_prompt("Ada").await;
    let msg = serde_json::to_string(&p.messages).unwrap();
    assert!(msg.contains("Hello, Ada! (loc)"), "{msg}");
    let done = n
        .catalog
        .complete(
            &c,
            CompleteRequestParams::new(
                Reference::for_prompt("web__greet"),
                ArgumentInfo::new("name", "B"),
            ),
        )
        .await
        .unwrap();
    assert_eq!(done.completion.values, vec!["Bob".to_string()]);

    // Capabilities: Haven's own, with list changes announced for all three lists.
    let caps = n.catalog.info().capabilities;
    assert_eq!(caps.tools.unwrap().list_changed, Some(true));
    assert_eq!(caps.prompts.unwrap().list_changed, Some(true));
    assert_eq!(caps.resources.unwrap().list_changed, Some(true));

    // The lists are records every node serves.
    let (_, lists) = n.record("web").await.unwrap();
    assert_eq!(lists.tools.len(), 10);
    assert!(lists.fetched_at_millis > 0);
    assert!(n.announcement("list/tools").await.is_some());

    // Status is JSON without secret values.
    let status = serde_json::to_string(&n.upstreams.status()).unwrap();
    assert!(!status.contains(SECRET_VALUE), "{status}");
    let v: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v[0]["name"], "local");
    assert_eq!(v[0]["state"], "connected");
    assert!(v[0]["pid"].as_u64().is_some());
    assert_eq!(v[1]["transport"], "http");
    assert!(v[1]["calls_ok"].as_u64().unwrap() >= 1);
    assert_eq!(v[1]["calls_failed"], 1);

    n.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_changes_rewrite_the_record_and_are_announced() {
    let (web, n) = web_node(settings(), None).await;
    let (rev, lists) = n.record("web").await.unwrap();
    assert!(!lists.tools.iter().any(|t| t.name == "extra"));
    let announced = n.announcement("list/tools").await.unwrap();

    // The upstream adds a tool and says so.
    n.call("web__toggle", json!({})).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "record not rewritten",
        async || {
            let (r, lists) = n.record("web").await.unwrap();
            r > rev && lists.tools.iter().any(|t| t.name == "extra")
        },
    )
    .await;
    assert!(n.announcement("list/tools").await.unwrap() > announced);
    assert!(n.tool_names().await.contains(&"web__extra".to_string()));
    assert_eq!(
        n.call("web__extra", json!({})).await.unwrap().is_error,
        Some(false)
    );

    // A resource update becomes an announcement of the served URI.
    n.call("web__touch", json!({"uri": "test://items/3"}))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "no resource announcement",
        async || {
            n.announcement("resource/web+test://items/3")
                .await
                .is_some()
        },
    )
    .await;

    n.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_client_cancellation_cancel_the_upstream_request() {
    let (web, n) = web_node(settings(), Some(400)).await;

    // Progress of the upstream reaches the client; the timeout cancels the upstream call.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let token = Some(ProgressToken(NumberOrString::Number(7)));
    let c = ctx_with(&n.store, token, Some(tx), CancellationToken::new());
    let call = n.call_with(&c, "web__slow", json!({"ms": 10_000}));
    let e = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the upstream timeout did not end the call")
        .unwrap_err();
    assert_eq!(e.code.0, UPSTREAM_TIMEOUT, "{e:?}");
    assert!(
        e.message
            .contains("upstream 'web' did not answer tools/call within 400 ms"),
        "{e:?}"
    );
    let Ok(Item::Notify(progress)) = rx.try_recv() else {
        panic!("no progress forwarded")
    };
    assert!(progress.contains("notifications/progress"), "{progress}");
    assert!(
        progress.contains("web sleeping") && progress.contains("\"progressToken\":7"),
        "{progress}"
    );
    wait_until(
        Duration::from_secs(5),
        "upstream never saw the cancellation",
        async || web.probe.cancelled.load(Ordering::SeqCst) >= 1,
    )
    .await;

    // A client that cancels cancels the upstream request too.
    let token = CancellationToken::new();
    let c = ctx_with(&n.store, None, None, token.clone());
    // It cancels once the upstream has started the call.
    let started = web.probe.slow_started.load(Ordering::SeqCst);
    let canceller = async {
        wait_until(
            Duration::from_secs(5),
            "the upstream never started the call",
            async || web.probe.slow_started.load(Ordering::SeqCst) != started,
        )
        .await;
        token.cancel();
    };
    let call = n.call_with(&c, "web__slow", json!({"ms": 10_000}));
    let (answer, ()) = tokio::join!(call, canceller);
    let e = answer.unwrap_err();
    assert_eq!(e.code.0, REQUEST_CANCELLED, "{e:?}");
    wait_until(
        Duration::from_secs(5),
        "upstream never saw the cancellation",
        async || web.probe.cancelled.load(Ordering::SeqCst) >= 2,
    )
    .await;

    n.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_calls_to_http_go_without_rmcps_service_and_its_requests_are_answered() {
    let (web, n) = web_node(settings(), None).await;
    // The answers of the test upstream (rmcp, with sessions) are SSE streams.
    let r = n.call("web__add", json!({"a": 2, "b": 3})).await.unwrap();
    assert_eq!(text_of(&r), "5");
    // The upstream asks Haven for its roots in the middle of the call, on the call's stream:
    // answered (an empty list), and the call goes on to its answer.
    let r = n.call("web__roots", json!({})).await.unwrap();
    assert_eq!(text_of(&r), "roots: 0");
    // Both were sent with Haven's own request ids, not through rmcp's service (whose ids
    // are numbers).
    let ids = web.probe.call_ids.lock().clone();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.iter().all(|id| id.starts_with("haven-")), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
    n.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_failures_and_half_opens_after_cooldown() {
    let mut s = settings();
    s.breaker_failures = 2;
    s.breaker_cooldown_ms = 700;
    let (web, n) = web_node(s, Some(200)).await;

    // Tool errors (isError) are answers, not failures.
    for _ in 0..4 {
        n.call("web__flaky", json!({})).await.unwrap();
    }
    assert_eq!(n.status("web").unwrap().consecutive_failures, 0);

    // Two timeouts open the breaker.
    for _ in 0..2 {
        let e = n.call("web__slow", json!({"ms": 5_000})).await.unwrap_err();
        assert_eq!(e.code.0, UPSTREAM_TIMEOUT);
    }
    assert_eq!(n.status("web").unwrap().state, UpstreamState::BreakerOpen);
    let reached = web.probe.calls.load(Ordering::SeqCst);
    let e = n
        .call("web__add", json!({"a": 1, "b": 1}))
        .await
        .unwrap_err();
    assert_eq!(e.code.0, UPSTREAM_UNAVAILABLE);
    assert!(e.message.contains("circuit breaker open"), "{e:?}");
    assert_eq!(
        web.probe.calls.load(Ordering::SeqCst),
        reached,
        "an open breaker refuses without reaching the upstream"
    );

    // After the cooldown one trial goes through; a failed trial opens it again.
    let e = n
        .call_after_cooldown("web__slow", json!({"ms": 5_000}))
        .await
        .unwrap_err();
    assert_eq!(e.code.0, UPSTREAM_TIMEOUT);
    let e = n
        .call("web__add", json!({"a": 1, "b": 1}))
        .await
        .unwrap_err();
    assert!(e.message.contains("circuit breaker open"), "{e:?}");

    // A successful trial closes it.
    let r = n
        .call_after_cooldown("web__add", json!({"a": 1, "b": 1}))
        .await
        .unwrap();
    assert_eq!(text_of(&r), "2");
    let st = n.status("web").unwrap();
    assert_eq!(
        (st.state, st.consecutive_failures),
        (UpstreamState::Connected, 0)
    );
    n.call("web__add", json!({"a": 1, "b": 1})).await.unwrap();

    n.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_stdio_upstream_is_restarted() {
    let (n, pid) = stdio_node("loc").await;
    let r = n.call("local__pid", json!({})).await.unwrap();
    assert_eq!(text_of(&r), pid.to_string());

    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    // Calls fail at once (unavailable, not after the upstream timeout) while it is down, then
    // succeed against a new process.
    let mut failures = 0;
    let every = Duration::from_millis(20);
    let new_pid = retry(
        Duration::from_secs(20),
        every,
        "not restarted",
        async || match n.call("local__pid", json!({})).await {
            Ok(r) => Some(text_of(&r)),
            Err(e) => {
                assert_eq!(e.code.0, UPSTREAM_UNAVAILABLE, "slow failure: {e:?}");
                failures += 1;
                None
            }
        },
    )
    .await;
    assert!(failures >= 1);
    assert_ne!(new_pid, pid.to_string());
    let st = n.status("local").unwrap();
    assert_eq!(st.restarts, 1, "{st:?}");
    assert_eq!(st.pid.unwrap().to_string(), new_pid);
    // The killed child was reaped.
    assert!(!process_exists(pid));

    n.stop().await;
    assert!(
        !process_exists(new_pid.parse().unwrap()),
        "child left running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstream_that_restarts_is_used_again() {
    let (web, n) = web_node(settings(), None).await;
    let addr = web.addr;
    n.call("web__add", json!({"a": 1, "b": 2})).await.unwrap();

    web.stop().await;
    // While it is down, calls fail (within the upstream timeout of 5 s).
    let call = n.call("web__add", json!({"a": 1, "b": 2}));
    let e = tokio::time::timeout(Duration::from_secs(6), call)
        .await
        .expect("a call to an upstream that is down did not fail")
        .unwrap_err();
    assert!(
        [UPSTREAM_UNAVAILABLE, UPSTREAM_TIMEOUT].contains(&e.code.0),
        "{e:?}"
    );

    let web = HttpUpstream::start("web2", addr).await.unwrap();
    let every = Duration::from_millis(50);
    let r = retry(
        Duration::from_secs(20),
        every,
        "upstream not used again",
        async || n.call("web__add", json!({"a": 1, "b": 2})).await.ok(),
    )
    .await;
    assert_eq!(text_of(&r), "3");
    // The new server answers (a new session).
    let (_, text) = n.read_text("web+test://static/hello").await;
    assert_eq!(text, "hello from web2");

    // Restarted between two calls: its session is gone, so it is re-opened and the call sent
    // again. (A call that raced the old server's shutdown on a kept-alive connection may fail:
    // it is not provably undelivered, so it is not resent.)
    web.stop().await;
    let web = HttpUpstream::start("web3", addr).await.unwrap();
    let mut failures = 0;
    let r = retry(
        Duration::from_secs(20),
        every,
        "upstream not used again",
        async || match n.call("web__add", json!({"a": 2, "b": 2})).await {
            Ok(r) => Some(r),
            Err(e) => {
                failures += 1;
                assert!(failures <= 2, "{e:?}");
                None
            }
        },
    )
    .await;
    assert_eq!(text_of(&r), "4");
    // Executed exactly once by the new server.
    assert_eq!(web.probe.calls.load(Ordering::SeqCst), 1);

    n.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_hanging_upstreams_fail_while_a_healthy_one_answers() {
    // A route answering 200 text/plain to everything, and a listener that never answers.
    let garbage = serve_local(
        axum::Router::new()
            .fallback(|| async { ([(axum::http::header::CONTENT_TYPE, "text/plain")], "nope") }),
    )
    .await;
    let hanging = tokio::net::TcpListener::bind(local()).await.unwrap();
    let hanging_url = format!("http://{}/mcp", hanging.local_addr().unwrap());
    let hanging_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = hanging.accept().await {
            held.push(sock);
        }
    });
    let web = HttpUpstream::start("web", local()).await.unwrap();

    let mut s = settings();
    s.connect_timeout_ms = 600;
    s.timeout_ms = 1_000;
    let n = Arc::new(node(s));
    n.register(http_spec("web", &web.url)).await;
    n.register(http_spec("garbage", &garbage.url)).await;
    n.register(http_spec("hanging", &hanging_url)).await;
    n.wait_state("web", UpstreamState::Connected, CONNECT).await;

    // Each bad upstream fails its call within its connect timeout and call timeout.
    let bad = |name: &'static str| {
        let n = n.clone();
        tokio::spawn(async move {
            let tool = format!("{name}__add");
            let call = n.call(&tool, json!({"a": 1, "b": 1}));
            tokio::time::timeout(Duration::from_millis(1_500), call)
                .await
                .unwrap_or_else(|_| panic!("{name}: the call did not fail in time"))
                .unwrap_err()
        })
    };
    let g = bad("garbage");
    let h = bad("hanging");
    // The healthy upstream and the lists answer meanwhile, not held up behind the bad ones.
    for _ in 0..5 {
        let healthy = async {
            let r = n.call("web__add", json!({"a": 2, "b": 2})).await.unwrap();
            assert_eq!(text_of(&r), "4");
            assert!(n.tool_names().await.contains(&"web__add".to_string()));
        };
        tokio::time::timeout(Duration::from_millis(500), healthy)
            .await
            .expect("the healthy upstream waited for the bad ones");
    }
    let e = g.await.unwrap();
    assert!(e.message.contains("garbage"), "{e:?}");
    let e = h.await.unwrap();
    assert!(e.message.contains("hanging"), "{e:?}");
    // Operators see why.
    let st = n.status("garbage").unwrap();
    assert_ne!(st.state, UpstreamState::Connected);
    assert!(st.last_error.is_some(), "{st:?}");
    let st = n.status("hanging").unwrap();
    assert_ne!(st.state, UpstreamState::Connected);

    let n = Arc::try_unwrap(n).ok().unwrap();
    n.stop().await;
    web.stop().await;
    garbage.stop().await;
    hanging_task.abort();
    let _ = hanging_task.await;
}

/// Asserts that no tool of the upstream `local` is listed any more and that this was announced
/// (after `announced`); returns the error of calling one of them.
async fn local_tools_withdrawn(n: &Node, announced: u64) -> ErrorData {
    assert!(
        !n.tool_names()
            .await
            .iter()
            .any(|t| t.starts_with("local__"))
    );
    assert!(n.announcement("list/tools").await.unwrap() > announced);
    n.call("local__add", json!({"a": 1, "b": 1}))
        .await
        .unwrap_err()
}

// Long by design: one upstream changed, disabled and removed in turn, the pool checked after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_disabled_and_removed_upstreams() {
    let (n, pid1) = stdio_node("one").await;

    // A changed entry reconnects (the old child goes away).
    n.register(stdio_spec("local", "two")).await;
    let every = Duration::from_millis(20);
    let pid2 = retry(CONNECT, every, "not reconnected", async || {
        let st = n.status("local")?;
        (st.state == UpstreamState::Connected)
            .then_some(st.pid?)
            .filter(|p| *p != pid1)
    })
    .await;
    wait_until(
        Duration::from_secs(10),
        "old child still running",
        async || !process_exists(pid1),
    )
    .await;
    let p = n.greet_prompt("X").await;
    assert!(serde_json::to_string(&p).unwrap().contains("(two)"));

    // Disabled: closed, not served, shown as disabled.
    let announced = n.announcement("list/tools").await.unwrap();
    let mut spec = stdio_spec("local", "two");
    spec.disabled = true;
    n.register(spec).await;
    n.wait_state("local", UpstreamState::Disabled, CONNECT)
        .await;
    wait_until(
        Duration::from_secs(10),
        "disabled child still running",
        async || !process_exists(pid2) && n.record("local").await.is_none(),
    )
    .await;
    let e = local_tools_withdrawn(&n, announced).await;
    assert!(e.message.contains("disabled"), "{e:?}");

    // Enabled again, then removed: the process is gone and so are its tools.
    n.register(stdio_spec("local", "three")).await;
    let pid3 = n
        .wait_state("local", UpstreamState::Connected, CONNECT)
        .await
        .pid
        .unwrap();
    assert!(n.tool_names().await.contains(&"local__add".to_string()));
    let announced = n.announcement("list/tools").await.unwrap();
    Registry::new(n.store.clone())
        .remove("local")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "removed child still running",
        async || {
            !process_exists(pid3)
                && n.record("local").await.is_none()
                && n.status("local").is_none()
        },
    )
    .await;
    // Its names now belong to the base catalog, which does not know them.
    let e = local_tools_withdrawn(&n, announced).await;
    assert!(e.message.contains("Unknown tool"), "{e:?}");

    n.stop().await;
}

/// A hand-written Streamable HTTP upstream that completes the handshake and lists the tools
/// `bad` and `good`, but answers `bad` {variant} with garbage: 1 a body that is not JSON (as
/// application/json), 2 a result of the wrong shape, 3 a response with another id, 4 HTTP 500
/// with HTML, 5 no response (the connection is closed). `good` answers properly.
#[derive(Default)]
struct Shaky {
    bad_calls: std::sync::atomic::AtomicU64,
    good_calls: std::sync::atomic::AtomicU64,
    /// The `X-Token` header of the last request.
    token: parking_lot::Mutex<Option<String>>,
}

async fn shaky_mcp(
    axum::extract::State(shaky): axum::extract::State<Arc<Shaky>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;

    *shaky.token.lock() = headers
        .get("x-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json_answer = |v: Value| {
        (
            StatusCode::OK,
            [
                ("content-type", "application/json"),
                ("mcp-session-id", "shaky-1"),
            ],
            v.to_string(),
        )
            .into_response()
    };
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(id) = msg.get("id").cloned() else {
        // Notifications (initialized, cancelled).
        return StatusCode::ACCEPTED.into_response();
    };
    let result = |r: Value| json_answer(json!({"jsonrpc": "2.0", "id": id, "result": r}));
    let params = &msg["params"];
    match msg["method"].as_str().unwrap_or("") {
        "initialize" => result(json!({
            "protocolVersion": params["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "shaky", "version": "0.0.0"},
        })),
        "tools/list" => result(json!({"tools": [
            {"name": "bad", "description": "Answers garbage", "inputSchema": {"type": "object"}},
            {"name": "good", "description": "Answers", "inputSchema": {"type": "object"}},
        ]})),
        "tools/call" if params["name"] == "good" => {
            shaky.good_calls.fetch_add(1, Ordering::SeqCst);
            result(json!({"content": [{"type": "text", "text": "fine"}]}))
        }
        "tools/call" if params["name"] == "bad" => {
            shaky.bad_calls.fetch_add(1, Ordering::SeqCst);
            match params["arguments"]["variant"].as_u64() {
                Some(1) => (
                    [(CONTENT_TYPE, "application/json")],
                    "this is {not json at all",
                )
                    .into_response(),
                Some(2) => result(json!({"content": "not an array"})),
                Some(3) => json_answer(json!({
                    "jsonrpc": "2.0",
                    "id": "not-the-request",
                    "result": {"content": [{"type": "text", "text": "for someone else"}]},
                })),
                Some(4) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(CONTENT_TYPE, "text/html")],
                    "<html><body><h1>500 Internal Server Error</h1></body></html>",
                )
                    .into_response(),
                // A body that fails before its first byte: hyper closes the connection
                // without writing the response.
                _ => axum::body::Body::from_stream(futures::stream::once(async {
                    Err::<axum::body::Bytes, _>(std::io::Error::other("closed on purpose"))
                }))
                .into_response(),
            }
        }
        _ => json_answer(json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": -32601, "message": "Method not found"},
        })),
    }
}

// Long by design: one misbehaving upstream, through each kind of garbage it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_garbage_mid_call_gives_a_json_rpc_error() {
    use haven_federation::UPSTREAM_BAD_RESPONSE;

    let shaky = Arc::new(Shaky::default());
    let server = serve_local(
        axum::Router::new()
            .route(
                "/mcp",
                axum::routing::post(shaky_mcp)
                    .get(|| async { axum::http::StatusCode::METHOD_NOT_ALLOWED })
                    .delete(|| async { axum::http::StatusCode::OK }),
            )
            .with_state(shaky.clone()),
    )
    .await;

    // A breaker that never opens here, so every variant reaches the upstream.
    let mut s = settings();
    s.timeout_ms = 2_000;
    s.breaker_failures = 100;
    s.breaker_cooldown_ms = 100;
    let n = node(s);
    n.register(http_spec("shaky", &server.url)).await;
    n.wait_state("shaky", UpstreamState::Connected, CONNECT)
        .await;
    assert!(n.tool_names().await.contains(&"shaky__bad".to_string()));
    assert_eq!(shaky.token.lock().as_deref(), Some(SECRET_VALUE));

    let limit = Duration::from_millis(2_000 + 1_000);
    let mut seen = Vec::new();
    let mut messages = Vec::new();
    for variant in 1..=5u64 {
        let call = n.call("shaky__bad", json!({"variant": variant}));
        let Ok(outcome) = tokio::time::timeout(limit, call).await else {
            panic!("variant {variant}: no answer within {limit:?}");
        };
        let e = match outcome {
            Ok(r) => panic!("variant {variant}: garbage accepted as {r:?}"),
            Err(e) => e,
        };
        assert!(
            [
                UPSTREAM_TIMEOUT,
                UPSTREAM_UNAVAILABLE,
                UPSTREAM_BAD_RESPONSE
            ]
            .contains(&e.code.0),
            "variant {variant}: {e:?}"
        );
        assert!(e.message.contains("shaky"), "variant {variant}: {e:?}");
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.contains(SECRET_VALUE), "variant {variant}: {text}");
        seen.push((variant, e.code.0));
        messages.push(e.message);
    }
    // Each call reached the upstream exactly once (none was resent).
    assert_eq!(shaky.bad_calls.load(Ordering::SeqCst), 5);
    // Invalid answers are bad responses, and so is a JSON answer that is another request's
    // (the JSON answer to a POST is that request's answer), at once rather than at the
    // call's timeout; a server error or a lost connection is unavailability.
    assert_eq!(
        seen,
        [
            (1, UPSTREAM_BAD_RESPONSE),
            (2, UPSTREAM_BAD_RESPONSE),
            (3, UPSTREAM_BAD_RESPONSE),
            (4, UPSTREAM_UNAVAILABLE),
            (5, UPSTREAM_UNAVAILABLE),
        ],
        "{messages:#?}"
    );
    let st = n.status("shaky").unwrap();
    assert_eq!(st.consecutive_failures, 5, "{st:?}");
    assert!(
        !serde_json::to_string(&st).unwrap().contains(SECRET_VALUE),
        "{st:?}"
    );

    // The upstream is still usable.
    let mut last = None;
    let good = poll(Duration::from_millis(50), async || {
        match n.call("shaky__good", json!({})).await {
            Ok(r) => Some(r),
            Err(e) => {
                last = Some(e);
                None
            }
        }
    });
    let Ok(r) = tokio::time::timeout(Duration::from_secs(10), good).await else {
        panic!("good never answered: {last:?}")
    };
    assert_eq!(text_of(&r), "fine");
    assert_eq!(shaky.good_calls.load(Ordering::SeqCst), 1);
    let st = n.status("shaky").unwrap();
    assert_eq!(
        (st.state, st.consecutive_failures),
        (UpstreamState::Connected, 0),
        "{st:?}"
    );

    n.stop().await;
    server.stop().await;
}

/// A secret-looking query parameter of the leaky upstream's URL.
const QUERY_SECRET: &str = "QUERYSECRET-4711";

/// What no client error may hold: the secret, the URL's query, the upstream's error body, and
/// the names and formatting of Rust types and libraries.
fn assert_nothing_leaks(what: &str, e: &ErrorData) {
    let text = serde_json::to_string(e).unwrap();
    for bad in [
        SECRET_VALUE,
        QUERY_SECRET,
        "api_key",
        "?",
        "unauthorized: you sent",
        "authorization:",
        "::",
        "Error {",
        "Client error",
        "reqwest",
        "Streamable",
        "Transport",
        "127.0.0.1",
    ] {
        assert!(
            !text.contains(bad),
            "{what}: '{bad}' reached the client: {text}"
        );
    }
}

fn leaky_spec(name: &str, url: &str) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        transport: Transport::Http {
            url: url.into(),
            headers: BTreeMap::from([(
                "Authorization".to_string(),
                "Bearer ${secret:tok}".to_string(),
            )]),
        },
        timeout_ms: None,
        disabled: false,
        description: None,
    }
}

/// The details operators see: there (with `want`), with the secret and the query redacted
/// (`echoed`: the details quote the upstream's echo, so something was redacted).
fn assert_redacted_detail(what: &str, st: &UpstreamStatus, want: &str, echoed: bool) {
    let detail = st.last_error.clone().unwrap_or_default();
    assert!(
        detail.contains(want),
        "{what}: '{want}' missing from {detail}"
    );
    assert_eq!(detail.contains("[redacted]"), echoed, "{what}: {detail}");
    for bad in [SECRET_VALUE, QUERY_SECRET] {
        assert!(!detail.contains(bad), "{what}: {bad} in {detail}");
    }
    let json = serde_json::to_string(st).unwrap();
    assert!(
        !json.contains(SECRET_VALUE) && !json.contains(QUERY_SECRET),
        "{json}"
    );
}

// Long by design: one leaky upstream through every kind of request that reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_reach_clients_as_reasons_and_operators_redacted() {
    let leaky = haven_testkit::LeakyUpstream::start().await;
    let mut s = settings();
    s.breaker_failures = 100;
    let n = node(s);
    n.register(leaky_spec(
        "leaky",
        &leaky.url(&format!("/mcp?api_key={QUERY_SECRET}&v=1")),
    ))
    .await;
    n.register(leaky_spec(
        "denied",
        &leaky.url(&format!("/deny?api_key={QUERY_SECRET}")),
    ))
    .await;
    n.wait_state("leaky", UpstreamState::Connected, CONNECT)
        .await;
    // The upstream works and got the secret (so it has something to leak).
    assert_eq!(
        text_of(&n.call("leaky__ok", json!({})).await.unwrap()),
        "fine"
    );
    assert!(
        leaky
            .authorizations()
            .iter()
            .any(|a| a == &[format!("Bearer {SECRET_VALUE}")]),
        "{:?}",
        leaky.authorizations()
    );

    // tools/call: each kind of HTTP failure, as a reason (and a status).
    // (rmcp keeps the bodies of a 401 with a challenge and of a 500 to itself.)
    for (tool, reason, status, code, echoed) in [
        ("leaky", "auth_rejected", 401, UPSTREAM_UNAVAILABLE, true),
        (
            "leaky_challenge",
            "auth_rejected",
            401,
            UPSTREAM_UNAVAILABLE,
            false,
        ),
        ("leaky_500", "http_status", 500, UPSTREAM_UNAVAILABLE, false),
    ] {
        let e = n
            .call(&format!("leaky__{tool}"), json!({}))
            .await
            .unwrap_err();
        assert_nothing_leaks(tool, &e);
        assert_eq!(
            e.data,
            Some(json!({"upstream": "leaky", "reason": reason, "status": status})),
            "{tool}: {e:?}"
        );
        assert_eq!(e.code.0, code, "{tool}: {e:?}");
        assert!(e.message.contains("upstream 'leaky'"), "{e:?}");
        // Operators get the details, redacted.
        let st = n.status("leaky").unwrap();
        assert_redacted_detail(tool, &st, &format!("HTTP {status}"), echoed);
        assert_eq!(
            serde_json::to_value(st.last_error_reason).unwrap(),
            json!(reason)
        );
        if echoed {
            // What the upstream said, without the secret and the query.
            assert_redacted_detail(
                tool,
                &st,
                "unauthorized: you sent authorization: [redacted] to /mcp?[redacted]",
                true,
            );
        }
    }

    // An upstream's own JSON-RPC error is its answer and is passed on, but without the
    // secret values Haven knows and without the URL's query.
    let e = n.call("leaky__leaky_json", json!({})).await.unwrap_err();
    assert_eq!(e.code.0, -32000, "{e:?}");
    let text = serde_json::to_string(&e).unwrap();
    assert!(text.contains("unauthorized: you sent"), "{text}");
    assert!(
        !text.contains(SECRET_VALUE) && !text.contains(QUERY_SECRET),
        "{text}"
    );

    // resources/read and prompts/get.
    let c = ctx(&n.store);
    let e = n
        .catalog
        .read_resource(&c, "leaky+leak://doc", Round::default())
        .await
        .unwrap_err();
    assert_nothing_leaks("resources/read", &e);
    assert_eq!(
        e.data,
        Some(json!({"upstream": "leaky", "reason": "auth_rejected", "status": 401}))
    );
    let e = n
        .catalog
        .get_prompt(
            &c,
            "leaky__leaky_prompt",
            JsonObject::new(),
            Round::default(),
        )
        .await
        .unwrap_err();
    assert_nothing_leaks("prompts/get", &e);
    assert_eq!(
        e.data,
        Some(json!({"upstream": "leaky", "reason": "auth_rejected", "status": 403}))
    );

    // An upstream that refuses the handshake: calls fail with the reason of its last
    // connection attempt; the details are in its status, redacted.
    let st = retry(
        CONNECT,
        Duration::from_millis(20),
        "the denied upstream never recorded its failure",
        async || {
            n.status("denied")
                .filter(|s| s.state == UpstreamState::Backoff && s.last_error.is_some())
        },
    )
    .await;
    assert_redacted_detail("denied", &st, "HTTP 401", true);
    let e = n.call("denied__anything", json!({})).await.unwrap_err();
    assert_nothing_leaks("denied", &e);
    let data = e.data.clone().unwrap();
    assert_eq!(data["upstream"], "denied", "{e:?}");
    // Between its attempts it is backing off (auth_rejected); an attempt may be under way.
    assert!(
        [json!("auth_rejected"), json!("timeout")].contains(&data["reason"]),
        "{e:?}"
    );

    n.stop().await;
    leaky.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_entry_with_url_credentials_and_an_authorization_header_sends_the_urls() {
    let leaky = haven_testkit::LeakyUpstream::start().await;
    let n = node(settings());
    // Registering the combination is refused, and nothing is stored.
    let url = leaky
        .url("/mcp")
        .replace("http://", "http://alice:pa55word@");
    let spec = leaky_spec("both", &url);
    let refused = Registry::new(n.store.clone())
        .add(&spec, &spec.secret_references(), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("carries credentials"), "{refused}");
    assert!(!refused.contains("pa55word"), "{refused}");
    assert!(
        n.store
            .get(haven_control::registry::REGISTRY_NS, "both")
            .await
            .unwrap()
            .is_none()
    );
    // An entry stored before the refusal keeps working: the URL's credentials win, sent once
    // as Basic; the configured header is not sent; the status says so.
    n.store
        .commit(haven_state::Batch::new().put(
            haven_control::registry::REGISTRY_NS,
            "both",
            serde_json::to_vec(&spec).unwrap(),
        ))
        .await
        .unwrap();
    let st = n
        .wait_state("both", UpstreamState::Connected, CONNECT)
        .await;
    let warning = st.warning.unwrap_or_default();
    assert!(warning.contains("credentials win"), "{st:?}");
    assert_eq!(
        text_of(&n.call("both__ok", json!({})).await.unwrap()),
        "fine"
    );
    let basic = "Basic YWxpY2U6cGE1NXdvcmQ="; // alice:pa55word
    let seen = leaky.authorizations();
    assert!(!seen.is_empty());
    for a in &seen {
        assert_eq!(a, &[basic.to_string()], "{seen:?}");
    }
    // Its password is a known secret: redacted from what operators see.
    let e = n.call("both__leaky", json!({})).await.unwrap_err();
    assert_nothing_leaks("both", &e);
    let st = n.status("both").unwrap();
    let detail = st.last_error.unwrap();
    assert!(
        !detail.contains("YWxpY2U6cGE1NXdvcmQ") && !detail.contains("pa55word"),
        "{detail}"
    );
    n.stop().await;
    leaky.stop().await;
}

/// A pool started with its upstreams held starts none: every enabled upstream is `Held`, no
/// request reaches it, a call fails with `not_connected` (while the lists another node fetched
/// stay listed), and a disabled one stays `Disabled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_upstreams_are_not_started() {
    let (web, n) = web_node(settings(), None).await;
    let mut off = http_spec("off", &web.url);
    off.disabled = true;
    n.register(off).await;
    let (_tx, rx) = watch::channel(settings());
    let held = Upstreams::start_with_options(
        n.store.clone(),
        Arc::new(MapSecrets(BTreeMap::new())),
        rx,
        haven_federation::UpstreamTls::default(),
        true,
    );
    let catalog = held.catalog(Arc::new(DefaultCatalog::new()));
    let state = |name: &str| {
        held.status()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.state)
    };
    wait_until(
        CONNECT,
        "the held pool did not read the registry",
        async || state("web").is_some() && state("off").is_some(),
    )
    .await;
    assert_eq!(state("web"), Some(UpstreamState::Held));
    assert_eq!(state("off"), Some(UpstreamState::Disabled));
    let calls = web.probe.calls.load(Ordering::SeqCst);
    let tools: Vec<String> = catalog
        .tools(&ctx(&n.store))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert!(tools.contains(&"web__add".to_string()), "{tools:?}");
    let Value::Object(args) = json!({"a": 1, "b": 2}) else {
        panic!()
    };
    let e = match catalog
        .call_tool(&ctx(&n.store), "web__add", args, Round::default())
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("a held upstream answered"),
    };
    assert_eq!(e.data.as_ref().unwrap()["reason"], "not_connected", "{e:?}");
    assert_eq!(web.probe.calls.load(Ordering::SeqCst), calls);
    // The other node still serves it.
    let r = n.call("web__add", json!({"a": 1, "b": 2})).await.unwrap();
    assert_eq!(text_of(&r), "3");
    held.shutdown().await;
    n.stop().await;
    web.stop().await;
}

/// A hand-written Streamable HTTP upstream whose answers to `tools/call` are SSE streams that
/// end before the answer: `once` after one event (the answer follows when the stream is
/// resumed with `Last-Event-ID`), `never` every time (each resumption ends after one more
/// event), `no_id` after an event without an id (nothing to resume from).
#[derive(Default)]
struct Cutting {
    /// Every `tools/call` request id, in order.
    call_ids: parking_lot::Mutex<Vec<Value>>,
    /// Every resumption: the `Last-Event-ID` and `Mcp-Session-Id` it carried.
    resumes: parking_lot::Mutex<Vec<(String, Option<String>)>>,
    /// The request id of the `once` call, answered on its resumption.
    once: parking_lot::Mutex<Option<Value>>,
}

fn sse(events: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::OK,
        [
            ("content-type", "text/event-stream"),
            ("mcp-session-id", "cutting-1"),
        ],
        events,
    )
        .into_response()
}

fn progress_event(id: Option<&str>, token: &Value, message: &str) -> String {
    let data = json!({
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": token, "progress": 1, "message": message},
    });
    match id {
        Some(id) => format!("id: {id}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

async fn cutting_post(
    axum::extract::State(cut): axum::extract::State<Arc<Cutting>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(id) = msg.get("id").cloned() else {
        return StatusCode::ACCEPTED.into_response();
    };
    let params = &msg["params"];
    let json_result = |r: Value| {
        (
            StatusCode::OK,
            [
                ("content-type", "application/json"),
                ("mcp-session-id", "cutting-1"),
            ],
            json!({"jsonrpc": "2.0", "id": id, "result": r}).to_string(),
        )
            .into_response()
    };
    match msg["method"].as_str().unwrap_or("") {
        "initialize" => json_result(json!({
            "protocolVersion": params["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "cutting", "version": "0.0.0"},
        })),
        "tools/list" => {
            let tools = ["once", "never", "no_id"]
                .map(|n| json!({"name": n, "inputSchema": {"type": "object"}}));
            json_result(json!({ "tools": tools }))
        }
        "tools/call" => {
            cut.call_ids.lock().push(id.clone());
            let token = &params["_meta"]["progressToken"];
            match params["name"].as_str().unwrap_or("") {
                "once" => {
                    *cut.once.lock() = Some(id.clone());
                    sse(progress_event(Some("once-1"), token, "halfway"))
                }
                "never" => sse(progress_event(Some("never-0"), token, "cut")),
                _ => sse(progress_event(None, token, "cut without an id")),
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn cutting_get(
    axum::extract::State(cut): axum::extract::State<Arc<Cutting>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;

    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // The session's own stream (no `Last-Event-ID`) is not offered.
    let Some(last) = header("last-event-id") else {
        return axum::http::StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    cut.resumes
        .lock()
        .push((last.clone(), header("mcp-session-id")));
    if last == "once-1" {
        let id = cut.once.lock().clone().unwrap_or(Value::Null);
        let answer = json!({
            "jsonrpc": "2.0",
            "id": id,
            "result": {"content": [{"type": "text", "text": "resumed"}]},
        });
        return sse(format!("id: once-2\ndata: {answer}\n\n"));
    }
    match last
        .strip_prefix("never-")
        .and_then(|n| n.parse::<u32>().ok())
    {
        // One more event, and the stream ends again.
        Some(n) => sse(format!(
            "id: never-{}\ndata: {}\n\n",
            n + 1,
            json!({"jsonrpc": "2.0", "method": "notifications/message",
                   "params": {"level": "info", "data": "still cut"}}),
        )),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stream_cut_before_the_answer_is_resumed_from_its_last_event() {
    let cut = Arc::new(Cutting::default());
    let server = serve_local(
        axum::Router::new()
            .route(
                "/mcp",
                axum::routing::post(cutting_post)
                    .get(cutting_get)
                    .delete(|| async { axum::http::StatusCode::OK }),
            )
            .with_state(cut.clone()),
    )
    .await;

    let mut s = settings();
    s.breaker_failures = 100;
    let n = node(s);
    n.register(http_spec("cutting", &server.url)).await;
    n.wait_state("cutting", UpstreamState::Connected, CONNECT)
        .await;

    // Cut after its first event: resumed once, in the session, from that event; the event's
    // progress reaches the client, and the answer comes from the resumed stream.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let token = Some(ProgressToken(NumberOrString::Number(7)));
    let c = ctx_with(&n.store, token, Some(tx), CancellationToken::new());
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        n.call_with(&c, "cutting__once", json!({})),
    )
    .await
    .expect("no answer")
    .unwrap();
    assert_eq!(text_of(&r), "resumed");
    assert_eq!(
        *cut.resumes.lock(),
        [("once-1".to_string(), Some("cutting-1".to_string()))]
    );
    let Ok(Item::Notify(progress)) = rx.try_recv() else {
        panic!("the cut stream's progress was not forwarded")
    };
    assert!(
        progress.contains("halfway") && progress.contains("\"progressToken\":7"),
        "{progress}"
    );
    // It went without rmcp's service (Haven's own ids).
    let ids = cut.call_ids.lock().clone();
    assert!(
        ids.iter()
            .all(|i| i.as_str().is_some_and(|s| s.starts_with("haven-"))),
        "{ids:?}"
    );

    // Cut every time: resumed three times, each from the last event seen, then the call
    // fails as a lost connection.
    cut.resumes.lock().clear();
    let e = tokio::time::timeout(Duration::from_secs(10), n.call("cutting__never", json!({})))
        .await
        .expect("no answer")
        .unwrap_err();
    assert_eq!(e.code.0, UPSTREAM_UNAVAILABLE, "{e:?}");
    assert!(
        e.message
            .contains("closed the connection before it answered"),
        "{e:?}"
    );
    let resumed: Vec<String> = cut.resumes.lock().iter().map(|r| r.0.clone()).collect();
    assert_eq!(resumed, ["never-0", "never-1", "never-2"]);

    // Cut with no event id to resume from: fails at once, without a resumption.
    cut.resumes.lock().clear();
    let e = tokio::time::timeout(Duration::from_secs(10), n.call("cutting__no_id", json!({})))
        .await
        .expect("no answer")
        .unwrap_err();
    assert_eq!(e.code.0, UPSTREAM_UNAVAILABLE, "{e:?}");
    assert!(cut.resumes.lock().is_empty());
    // Each call was posted once: a stream resumed is not a call sent again.
    assert_eq!(cut.call_ids.lock().len(), 3);

    n.stop().await;
    server.stop().await;
}
