//! The engine's tool cache: the catalog's tools are listed once and kept until the tool list
//! changes (`Announcement::ToolsChanged`, from any node); other announcements (resource
//! updates, prompt and resource list changes) leave the cache alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use haven_catalogs::DefaultCatalog;
use haven_mcp::catalog::{Catalog, CatalogInfo, Ctx, Round, Step};
use haven_mcp::context::{Announcement, announce};
use haven_mcp::engine::{Engine, EngineConfig, Reply, StatelessHeaders, StatelessPost};
use haven_mcp::keyring::{KekSource, Secrets};
use haven_mcp::rmcp::model::{CallToolResult, ErrorData, JsonObject, Tool};
use haven_state::Store;
use serde_json::json;

type Called = Result<Step<CallToolResult>, ErrorData>;

/// The default catalog, counting how often its tools are listed.
struct Counting {
    base: DefaultCatalog,
    listed: Arc<AtomicUsize>,
}

#[async_trait]
impl Catalog for Counting {
    fn info(&self) -> CatalogInfo {
        self.base.info()
    }

    async fn tools(&self, ctx: &Ctx) -> Result<Vec<Tool>, ErrorData> {
        self.listed.fetch_add(1, Ordering::SeqCst);
        self.base.tools(ctx).await
    }

    async fn call_tool(&self, ctx: &Ctx, name: &str, args: JsonObject, round: Round) -> Called {
        self.base.call_tool(ctx, name, args, round).await
    }
}

async fn list_tools(engine: &Engine) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "tool-cache-test", "version": "1"}
    }}});
    let message = haven_mcp::jsonrpc::parse(body.to_string().as_bytes()).unwrap();
    let reply = engine
        .stateless_post(StatelessPost {
            headers: StatelessHeaders::default(),
            message,
            from_http: false,
            principal: haven_auth::Principal::anonymous(),
            trace: Default::default(),
        })
        .await;
    match reply {
        Reply::Json { body, .. } => assert!(body.contains("\"echo\""), "{body}"),
        other => panic!("tools/list answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_tool_list_change_drops_the_cached_tools() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = haven_testkit::redb_store(dir.path());
    let listed = Arc::new(AtomicUsize::new(0));
    let catalog = Counting {
        base: DefaultCatalog::new(),
        listed: listed.clone(),
    };
    let secrets = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let engine = Engine::start(
        store.clone(),
        Arc::new(catalog),
        EngineConfig::default(),
        secrets,
    )
    .await
    .unwrap();

    list_tools(&engine).await;
    list_tools(&engine).await;
    assert_eq!(
        listed.load(Ordering::SeqCst),
        1,
        "the second list is cached"
    );

    for other in [
        Announcement::ResourceUpdated("note://a".into()),
        Announcement::ResourcesChanged,
        Announcement::PromptsChanged,
    ] {
        announce(&*store, &other).await.unwrap();
    }
    // Long enough for the change hub to have routed them (it takes milliseconds).
    tokio::time::sleep(Duration::from_millis(500)).await;
    list_tools(&engine).await;
    assert_eq!(
        listed.load(Ordering::SeqCst),
        1,
        "announcements other than a tool list change keep the cache"
    );

    announce(&*store, &Announcement::ToolsChanged)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listed.load(Ordering::SeqCst) == 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a tool list change did not drop the cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        list_tools(&engine).await;
    }
    list_tools(&engine).await;
    assert_eq!(
        listed.load(Ordering::SeqCst),
        2,
        "listed again once, then cached"
    );
}
