//! The control plane of a node, wired together: the configuration service and what applies
//! its settings (log filter, body limit, built-in catalog, upstream settings), the registry,
//! the secrets service, and the federation of upstream MCP servers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use haven_control::config::ConfigService;
use haven_control::registry::Registry;
use haven_mcp::catalog::{Catalog, CatalogInfo, Ctx, Round, Step};
use haven_mcp::context::Announcement;
use haven_secrets::Secrets;
use haven_state::Store;
use parking_lot::RwLock;
use rmcp::model::{
    CallToolResult, CompleteRequestParams, CompleteResult, ErrorData, GetPromptResult, JsonObject,
    Prompt, ReadResourceResult, Resource, ResourceTemplate, Tool,
};

/// Changes the process's log filter (a `tracing_subscriber` reload handle, wrapped).
pub type LogReloader = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The control plane of one node.
#[derive(Clone)]
pub struct Control {
    /// Runtime settings.
    pub config: ConfigService,
    /// Upstream registry.
    pub registry: Registry,
    /// Secrets.
    pub secrets: Secrets,
    /// API keys (`haven auth keys`).
    pub api_keys: haven_auth::ApiKeys,
    /// Authorization rules (`haven auth rules`).
    pub rules: haven_auth::Rules,
    /// The rules in force on this node (followed from the store).
    pub policy: haven_auth::Policy,
    /// Connections to upstreams.
    pub upstreams: haven_federation::Upstreams,
    /// Body limit of the HTTP layer, changed by `limits.max_body_bytes`.
    pub max_body_bytes: Arc<AtomicUsize>,
    /// Connection caps and timeouts of the HTTP server, changed by the `http.*` settings.
    pub conn_limits: Arc<haven_server::ConnLimits>,
    /// Admission control of the HTTP server, changed by the `limits.*requests*` settings.
    pub admission: Arc<haven_server::layers::admission::Admission>,
    /// Rate limits of the HTTP server, changed by the `limits.rate.*` settings.
    pub rate: Arc<haven_server::rate::RateLimiter>,
    /// Limits on what a client controls, changed by the `limits.*` settings.
    pub client_limits: Arc<haven_mcp::limits::ClientLimits>,
    /// What the storage reclaimer has done (`crate::reclaim`).
    pub reclaim: Arc<parking_lot::Mutex<crate::reclaim::ReclaimStatus>>,
    /// The configuration snapshot this node has applied last.
    pub in_force: Arc<RwLock<Arc<haven_control::config::Snapshot>>>,
    /// Replication from the other regions (`None`: one region).
    pub regions: Option<Arc<haven_cluster::regions::Regions>>,
    /// The audit log (this node's chain).
    pub audit: haven_audit::Audit,
}

/// The built-in catalog, switchable at runtime by the `catalog` setting.
pub struct BuiltinCatalog {
    current: RwLock<Arc<dyn Catalog>>,
    name: RwLock<String>,
    info: CatalogInfo,
}

/// The note limits of this process's default catalog (one node per process), changed by
/// `limits.max_note_bytes` and `limits.max_notes`.
static NOTE_LIMITS: std::sync::LazyLock<Arc<haven_catalogs::NoteLimits>> =
    std::sync::LazyLock::new(Arc::default);

/// A built-in catalog by name.
pub fn builtin(name: &str) -> anyhow::Result<Arc<dyn Catalog>> {
    use haven_catalogs::{ConformanceCatalog, DefaultCatalog};
    match name {
        "default" => Ok(Arc::new(DefaultCatalog::with_limits(NOTE_LIMITS.clone()))),
        "conformance" => Ok(Arc::new(ConformanceCatalog::new())),
        "none" => Ok(Arc::new(EmptyCatalog)),
        other => {
            anyhow::bail!("unknown catalog {other:?}; choose one of: default, conformance, none")
        }
    }
}

impl BuiltinCatalog {
    /// Starts with catalog `name`. The identity clients see is the starting catalog's; the
    /// capabilities are those of every built-in catalog, so a switch never needs a new one.
    pub fn new(name: &str) -> anyhow::Result<BuiltinCatalog> {
        let first = builtin(name)?;
        let mut info = first.info();
        for other in ["default", "conformance"] {
            let o = builtin(other)?.info().capabilities;
            let c = &mut info.capabilities;
            c.tools = c.tools.take().or(o.tools);
            c.prompts = c.prompts.take().or(o.prompts);
            c.resources = c.resources.take().or(o.resources);
            c.logging = c.logging.take().or(o.logging);
            c.completions = c.completions.take().or(o.completions);
        }
        Ok(BuiltinCatalog {
            current: RwLock::new(first),
            name: RwLock::new(name.to_owned()),
            info,
        })
    }

    /// Switches to catalog `name`; returns whether anything changed.
    pub fn switch(&self, name: &str) -> anyhow::Result<bool> {
        if *self.name.read() == name {
            return Ok(false);
        }
        let next = builtin(name)?;
        *self.current.write() = next;
        *self.name.write() = name.to_owned();
        Ok(true)
    }

    fn get(&self) -> Arc<dyn Catalog> {
        self.current.read().clone()
    }
}

#[async_trait]
impl Catalog for BuiltinCatalog {
    fn info(&self) -> CatalogInfo {
        self.info.clone()
    }
    async fn tools(&self, ctx: &Ctx) -> Result<Vec<Tool>, ErrorData> {
        self.get().tools(ctx).await
    }
    fn task_support(&self, tool: &str) -> haven_mcp::catalog::TaskSupport {
        self.get().task_support(tool)
    }
    fn tracks_effects(&self, tool: &str) -> bool {
        self.get().tracks_effects(tool)
    }
    async fn call_tool(
        &self,
        ctx: &Ctx,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        self.get().call_tool(ctx, name, arguments, round).await
    }
    async fn resources(&self, ctx: &Ctx) -> Result<Vec<Resource>, ErrorData> {
        self.get().resources(ctx).await
    }
    async fn resource_templates(&self, ctx: &Ctx) -> Result<Vec<ResourceTemplate>, ErrorData> {
        self.get().resource_templates(ctx).await
    }
    async fn read_resource(
        &self,
        ctx: &Ctx,
        uri: &str,
        round: Round,
    ) -> Result<Step<ReadResourceResult>, ErrorData> {
        self.get().read_resource(ctx, uri, round).await
    }
    async fn prompts(&self, ctx: &Ctx) -> Result<Vec<Prompt>, ErrorData> {
        self.get().prompts(ctx).await
    }
    async fn get_prompt(
        &self,
        ctx: &Ctx,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<GetPromptResult>, ErrorData> {
        self.get().get_prompt(ctx, name, arguments, round).await
    }
    async fn complete(
        &self,
        ctx: &Ctx,
        params: CompleteRequestParams,
    ) -> Result<CompleteResult, ErrorData> {
        self.get().complete(ctx, params).await
    }
}

/// No built-in tools: a node that only serves its upstreams.
struct EmptyCatalog;

#[async_trait]
impl Catalog for EmptyCatalog {
    fn info(&self) -> CatalogInfo {
        let mut info = haven_catalogs::DefaultCatalog::new().info();
        info.instructions = None;
        info
    }
    async fn tools(&self, _ctx: &Ctx) -> Result<Vec<Tool>, ErrorData> {
        Ok(Vec::new())
    }
    async fn call_tool(
        &self,
        _ctx: &Ctx,
        name: &str,
        _arguments: JsonObject,
        _round: Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        Err(haven_mcp::catalog::unknown_tool(name))
    }
}

/// The values of start-up flags that a runtime setting overrides once it is set in the store.
pub struct StartupValues {
    /// `--log-level`.
    pub log_level: String,
    /// `--max-body-bytes`.
    pub max_body_bytes: usize,
    /// `--catalog`.
    pub catalog: String,
}

/// Applies the `limits.rate.*` settings to the rate limiters (the next request reads them).
fn apply_rates(rate: &haven_server::rate::RateLimits, r: &haven_control::config::RateSettings) {
    use haven_server::rate::Quota;
    rate.per_ip_rps.store(r.per_ip_rps, Ordering::Relaxed);
    rate.per_ip_burst.store(r.per_ip_burst, Ordering::Relaxed);
    rate.per_principal_rps
        .store(r.per_principal_rps, Ordering::Relaxed);
    rate.per_principal_burst
        .store(r.per_principal_burst, Ordering::Relaxed);
    rate.per_tool_rps.store(r.per_tool_rps, Ordering::Relaxed);
    rate.per_tool_burst
        .store(r.per_tool_burst, Ordering::Relaxed);
    rate.max_keys.store(r.max_keys as usize, Ordering::Relaxed);
    let tools = r
        .tools
        .iter()
        .map(|(name, t)| {
            let quota = Quota {
                count: t.count,
                period: std::time::Duration::from_secs(t.period_secs),
                burst: t.burst.unwrap_or(r.per_tool_burst),
            };
            (name.clone(), quota)
        })
        .collect();
    rate.set_tool_overrides(tools);
}

/// Applies every new configuration snapshot on this node: the log filter, the body limit, the
/// connection limits and the built-in catalog (upstream settings reach the federation layer through their own
/// channel). A changed catalog is announced so that clients re-list.
pub fn apply_config(
    control: &Control,
    store: Arc<dyn Store>,
    builtin: Arc<BuiltinCatalog>,
    log: Option<LogReloader>,
    startup: StartupValues,
) {
    let mut rx = control.config.subscribe();
    let max_body_bytes = control.max_body_bytes.clone();
    let conn_limits = control.conn_limits.clone();
    let client_limits = control.client_limits.clone();
    let admission = control.admission.limits.clone();
    let rate = control.rate.limits.clone();
    let in_force = control.in_force.clone();
    let audit = control.audit.clone();
    tokio::spawn(async move {
        let mut applied_log = None::<String>;
        loop {
            let snap = rx.borrow_and_update().clone();
            // A setting in the store wins once set; until then the start-up flag holds.
            let limit = if snap.entries["limits.max_body_bytes"].source == "store" {
                snap.max_body_bytes as usize
            } else {
                startup.max_body_bytes
            };
            max_body_bytes.store(limit, Ordering::Relaxed);
            let h = &snap.http;
            conn_limits
                .header_read_timeout_ms
                .store(h.header_read_timeout_ms, Ordering::Relaxed);
            conn_limits
                .body_read_timeout_ms
                .store(h.body_read_timeout_ms, Ordering::Relaxed);
            conn_limits
                .max_connections
                .store(h.max_connections as usize, Ordering::Relaxed);
            conn_limits
                .max_connections_per_ip
                .store(h.max_connections_per_ip as usize, Ordering::Relaxed);
            conn_limits
                .max_header_bytes
                .store(h.max_header_bytes as usize, Ordering::Relaxed);
            conn_limits
                .max_headers
                .store(h.max_headers as usize, Ordering::Relaxed);
            apply_rates(&rate, &snap.rate);
            client_limits.max_subscriptions_per_session.store(
                snap.max_subscriptions_per_session as usize,
                Ordering::Relaxed,
            );
            let a = &snap.admission;
            admission
                .max_requests
                .store(a.max_requests as usize, Ordering::Relaxed);
            admission
                .max_queued
                .store(a.max_queued as usize, Ordering::Relaxed);
            admission
                .queue_wait_ms
                .store(a.queue_wait_ms, Ordering::Relaxed);
            admission
                .max_requests_per_session
                .store(a.max_requests_per_session as usize, Ordering::Relaxed);
            admission
                .max_queue_delay_ms
                .store(a.max_queue_delay_ms, Ordering::Relaxed);
            client_limits
                .abandoned_call_ms
                .store(snap.abandoned_call_ms, Ordering::Relaxed);
            client_limits
                .max_call_ms
                .store(snap.max_call_ms, Ordering::Relaxed);
            client_limits
                .max_uri_bytes
                .store(snap.max_uri_bytes as usize, Ordering::Relaxed);
            client_limits
                .max_session_bytes
                .store(snap.max_session_bytes as usize, Ordering::Relaxed);
            client_limits
                .max_tasks_per_session
                .store(snap.max_tasks_per_session as usize, Ordering::Relaxed);
            client_limits
                .max_sessions_per_node
                .store(snap.max_sessions_per_node as usize, Ordering::Relaxed);
            NOTE_LIMITS
                .max_note_bytes
                .store(snap.max_note_bytes as usize, Ordering::Relaxed);
            NOTE_LIMITS
                .max_notes
                .store(snap.max_notes, Ordering::Relaxed);
            audit.set_retention_days(snap.audit_retention_days);
            audit.set_tool_calls(snap.audit_tool_calls);
            audit.set_checkpoint_interval(std::time::Duration::from_millis(
                snap.audit_checkpoint_interval_ms,
            ));
            let level = if snap.entries["log.level"].source == "store" {
                snap.log_level.clone()
            } else {
                startup.log_level.clone()
            };
            if applied_log.as_deref() != Some(level.as_str()) {
                if let Some(reload) = &log
                    && let Err(e) = reload(&level)
                {
                    tracing::warn!(filter = %level, error = %e, "could not apply the log filter");
                }
                applied_log = Some(level);
            }
            {
                let want = if snap.entries["catalog"].source == "store" {
                    snap.catalog.as_str()
                } else {
                    startup.catalog.as_str()
                };
                match builtin.switch(want) {
                    Ok(true) => {
                        tracing::info!(catalog = %want, "built-in catalog switched");
                        for a in [
                            Announcement::ToolsChanged,
                            Announcement::PromptsChanged,
                            Announcement::ResourcesChanged,
                        ] {
                            if let Err(e) = haven_mcp::context::announce(&*store, &a).await {
                                tracing::warn!(error = %e, "announcing the catalog switch failed");
                            }
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "could not switch the catalog"),
                }
            }
            tracing::debug!(seq = snap.applied_seq, "configuration applied");
            *in_force.write() = snap;
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
}
