//! The `haven` command: `haven serve` runs a node on its embedded store; `haven stdio` serves
//! the same catalog over stdio.

mod admin;
mod admin_audit;
mod admin_control;
mod audit_cmd;
mod backup_cmd;
mod client;
mod control;
mod control_cmd;
mod drill_cmd;
mod memory;
mod metrics;
mod nats_sync;
mod otlp;
mod reclaim;
mod region_cmd;
mod settings;
mod status;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use haven_mcp::engine::{Engine, EngineConfig};
use haven_state::{HybridClock, Origin, RedbStore, Store};
use settings::{Cli, Command, Mode, Settings};

// No `#[global_allocator]`: the system allocator (glibc's), tuned by `memory`. Under a steady
// load mimalloc's memory kept rising while glibc's stayed flat at about half of it, for about
// 6 to 14 % more CPU per request (BENCHMARKS.md, "Soak: the allocator").

fn main() -> std::process::ExitCode {
    // One crypto provider for every TLS configuration built in this process, including those
    // that libraries build with rustls's defaults.
    haven_state::tls::install_default_provider();
    let cli = Cli::parse();
    client::set_ca_file(cli.ca_file.clone());
    if let Command::Backup(cmd) = cli.command {
        return run_backup_command(cmd);
    }
    let cli = match cli.command {
        Command::Status(args) => return run_client_command(backup_cmd::status(args)),
        Command::Registry(cmd) => return run_client_command(control_cmd::registry(cmd)),
        Command::Config(cmd) => return run_client_command(control_cmd::config(cmd)),
        Command::Secrets(cmd) => return run_client_command(control_cmd::secrets(cmd)),
        Command::Auth(cmd) => return run_client_command(control_cmd::auth(cmd)),
        Command::Audit(cmd) => return run_client_command(audit_cmd::run(cmd)),
        Command::Drill(cmd) => return run_client_command(drill_cmd::run(cmd)),
        Command::Chaos(args) => return run_client_command(drill_cmd::chaos(args)),
        Command::Region(settings::RegionCommand::Status(a)) => {
            return run_client_command(backup_cmd::region_status(a));
        }
        Command::Region(settings::RegionCommand::Promote(a)) => {
            let path = if a.force {
                "/admin/v1/regions/promote?force=true"
            } else {
                "/admin/v1/regions/promote"
            };
            return run_client_command(backup_cmd::region_change(a.node, path));
        }
        Command::Region(settings::RegionCommand::Takeover(a)) => {
            return run_client_command(backup_cmd::region_takeover(a));
        }
        Command::Region(settings::RegionCommand::Bootstrap(a)) => {
            return run_client_command(region_cmd::bootstrap(a));
        }
        Command::Region(settings::RegionCommand::Demote(a)) => {
            return run_client_command(backup_cmd::region_change(a, "/admin/v1/regions/demote"));
        }
        command => Cli {
            command,
            ca_file: cli.ca_file,
        },
    };
    let result = Settings::from_cli(&cli).and_then(|(mode, s)| {
        memory::tune();
        if matches!(mode, Mode::Serve) {
            memory::start_trimming();
        }
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.enable_all();
        if let Some(n) = s.worker_threads {
            runtime.worker_threads(n);
        }
        let runtime = runtime.build().context("starting the async runtime")?;
        let (log, provider) = init_logging(&s);
        let result = runtime.block_on(async move {
            match mode {
                Mode::Serve => serve(s, log).await,
                Mode::Stdio => stdio(s, log).await,
            }
        });
        // Outside the runtime: the exporter's client blocks.
        if let Some(p) = provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("haven: warning: flushing the last spans: {e}");
        }
        result
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("haven: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_backup_command(cmd: settings::BackupCommand) -> std::process::ExitCode {
    run_client_command(backup_cmd::run(cmd))
}

/// Runs a command that talks to a node or a backup (not a server itself).
fn run_client_command(
    fut: impl std::future::Future<Output = Result<std::process::ExitCode>>,
) -> std::process::ExitCode {
    // A command whose output goes into a pipe that closes early (`| head`) ends quietly, as
    // command-line tools do, instead of panicking on the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("HAVEN_LOG")
                .ok()
                .and_then(|f| log_filter(&f).ok())
                .unwrap_or_else(|| log_filter("warn").expect("a valid filter")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("haven: error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            // 2: the command could not run (1 and 3 mean damage found / restore incomplete).
            eprintln!("haven: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Whether log lines to stderr may carry ANSI colour codes: only when stderr is a terminal
/// and `NO_COLOR` is unset, so that a log redirected to a file or a pipe (systemd, a
/// container runtime, `2>haven.log`) holds plain text.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The log filter `f`, with the log lines of rmcp (the MCP client library Haven talks to
/// upstreams with) off unless `f` names `rmcp`: they quote upstream answers unredacted (an
/// error page that echoes a request's `Authorization` header, say), while Haven logs every
/// upstream failure itself, redacted.
fn log_filter(f: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let f = if f.contains("rmcp") {
        f.to_owned()
    } else if f.trim().is_empty() {
        "rmcp=off".to_owned()
    } else {
        format!("{f},rmcp=off")
    };
    tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())
}

/// Starts logging to stderr, and the export of traces when `--otlp-endpoint` is given;
/// returns what changes the log filter later (the `log.level` setting) and the tracer
/// provider to shut down (flushing its spans) at the end.
fn init_logging(
    s: &Settings,
) -> (
    control::LogReloader,
    Option<opentelemetry_sdk::trace::SdkTracerProvider>,
) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt, reload};
    let filter =
        log_filter(&s.log_level).unwrap_or_else(|_| log_filter("info").expect("a valid filter"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt_layer = if s.log_format == "json" {
        // Lines inside a span with a trace context carry its `trace_id` and `span_id`.
        fmt::layer()
            .json()
            .event_format(haven_telemetry::trace::WithTraceIds(fmt::format().json()))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour_on_stderr())
            .with_filter(filter)
            .boxed()
    };
    let (otel, provider) = match tracer_provider(s) {
        Some(provider) => {
            use opentelemetry::trace::TracerProvider as _;
            // Spans are exported whatever the log filter says (Haven's own at info and
            // above, and every request's server span, which is at debug for the log; rmcp's
            // never, as in the log).
            let spans = tracing_subscriber::filter::Targets::new()
                .with_default(tracing::Level::INFO)
                .with_target(
                    haven_telemetry::trace::REQUEST_SPAN_TARGET,
                    tracing::Level::DEBUG,
                )
                .with_target("rmcp", tracing::level_filters::LevelFilter::OFF);
            // Spans carry what the semantic conventions ask for, not the code location,
            // thread or busy/idle times, and entering one does not activate its context (no
            // code here reads `Context::current`): each of these costs on every span, sampled
            // or not.
            // Short internal spans (store commits) are made directly with this tracer.
            haven_telemetry::trace::set_tracer(opentelemetry::global::BoxedTracer::new(Box::new(
                provider.tracer("haven"),
            )));
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("haven"))
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_context_activation(false)
                .with_filter(spans);
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel)
        .init();
    haven_telemetry::trace::carry_trace_ids();
    let reload: control::LogReloader = Arc::new(move |f: &str| {
        let filter = log_filter(f)?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    (reload, provider)
}

/// The OTLP/HTTP (protobuf) trace exporter of `--otlp-endpoint`, batching on its own thread,
/// sampling new traces at `--trace-sample-ratio` and following the caller's decision.
fn tracer_provider(s: &Settings) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    let endpoint = s.otlp_endpoint.as_ref()?;
    let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        endpoint.clone()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let exporter = match otlp::SpanExporter::new(url.clone(), std::time::Duration::from_secs(10)) {
        Ok(e) => e,
        Err(e) => {
            eprintln!(
                "haven: warning: traces are not exported: the OTLP exporter for {url} could not be built: {e}"
            );
            return None;
        }
    };
    let mut attributes = vec![opentelemetry::KeyValue::new(
        "cloud.region",
        s.region.clone(),
    )];
    if let Some(n) = &s.node_id {
        attributes.push(opentelemetry::KeyValue::new(
            "service.instance.id",
            n.clone(),
        ));
    }
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("haven")
        .with_attributes(attributes)
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                s.trace_sample_ratio,
            ))))
            .with_resource(resource)
            .build(),
    )
}

/// Tightens the files Haven keeps in its data directory (besides the store's, which the store
/// tightens itself) to 0600 when others may read them: the node id and the backup state files.
/// Key and token files are not changed but refused when open (see `haven_state::files`).
fn tighten_data_files(data: &Path) -> Result<()> {
    let entries = std::fs::read_dir(data).with_context(|| format!("reading {}", data.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", data.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name == "node-id"
            || name == "admin.url"
            || (name.starts_with("backup-generation") && name.ends_with(".json"));
        if ours {
            let f = entry.path();
            haven_state::files::tighten_if_present(&f, haven_state::files::FILE_MODE)
                .with_context(|| format!("restricting {} to its owner", f.display()))?;
        }
    }
    Ok(())
}

/// The node id kept in the data directory, created on first start.
fn node_id(dir: &Path, configured: Option<&str>) -> Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_owned());
    }
    let file = dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&file) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_owned());
        }
    }
    let id = format!("node-{:08x}", rand_u32());
    haven_state::files::write_private(&file, id.as_bytes())
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(id)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

async fn start_engine(
    s: &Settings,
    log: control::LogReloader,
) -> Result<(Engine, Arc<dyn Store>, control::Control)> {
    // Private to Haven's user (0700), and so is every file Haven keeps in it (0600): it holds
    // session ids, note text and every record in clear. An existing directory, or a file of
    // Haven's in it, that others may reach is tightened (and logged).
    haven_state::files::private_dir(&s.data)
        .with_context(|| format!("creating the data directory {}", s.data.display()))?;
    tighten_data_files(&s.data)?;
    let node = node_id(&s.data, s.node_id.as_deref())?;
    let origin = Origin::new(s.region.as_str(), node.as_str());
    let mut regions = None;
    // Presence on the NATS connection: killed nodes are found before the heartbeat's
    // time-to-live runs out (the embedded store has one node and needs none).
    let mut presence: Option<Arc<dyn haven_state::Presence>> = None;
    let store: Arc<dyn Store> = match &s.nats {
        Some(servers) => {
            if !s.peer_regions.is_empty() {
                check_domain(servers, &s.region, &s.nats_tls).await?;
            }
            let config = haven_state::NatsConfig {
                servers: servers.clone(),
                region: s.region.clone(),
                replicas: s.store_replicas,
                tls: s.nats_tls.clone(),
            };
            nats_sync::check(&s.nats_monitor).await;
            let store =
                haven_state::NatsStore::open(&config, origin, Arc::new(HybridClock::default()))
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "opening the NATS JetStream store at {}: {e}",
                            servers.join(",")
                        )
                    })?;
            let peers: Vec<(String, Arc<dyn haven_state::SharedLog>)> = s
                .peer_regions
                .iter()
                .map(|r| {
                    let log: Arc<dyn haven_state::SharedLog> = Arc::new(store.log().peer(r, r));
                    (r.clone(), log)
                })
                .collect();
            presence = Some(store.log().presence());
            let store: Arc<dyn Store> = Arc::new(store);
            if !peers.is_empty() {
                tracing::info!(
                    region = %s.region,
                    peers = %s.peer_regions.join(","),
                    "applying the change logs of the other regions"
                );
                regions = Some(Arc::new(haven_cluster::regions::Regions::start_with(
                    store.clone(),
                    &node,
                    peers,
                    s.region_health.clone(),
                )));
            }
            store
        }
        None => {
            let store = RedbStore::open(&s.data, origin, Arc::new(HybridClock::default())).map_err(|e| {
                let text = e.to_string();
                if text.contains("already open") || text.contains("lock") {
                    anyhow::anyhow!(
                        "the data directory {} is in use by another Haven process ({text}); stop it or choose another --data",
                        s.data.display()
                    )
                } else {
                    anyhow::anyhow!("opening the store in {}: {text}", s.data.display())
                }
            })?;
            Arc::new(store)
        }
    };
    // The process's metrics, every series labelled with this node; commits are timed.
    if s.metrics {
        haven_telemetry::install(haven_telemetry::Metrics::new(
            &s.region,
            &node,
            env!("CARGO_PKG_VERSION"),
        ));
    }
    let store = metrics::MeteredStore::wrap(store);
    let secrets = open_secrets(s, &store).await?;
    // The audit log: this node's chain, signed with the key in DATA/audit.key.
    let audit_key = haven_audit::key::load_or_create(&s.data)?;
    let audit = haven_audit::Audit::start(
        store.clone(),
        audit_key,
        haven_audit::AuditConfig::default(),
    )
    .await
    .context("starting the audit log")?;
    let config = haven_control::config::ConfigService::start(store.clone())
        .await
        .context("reading the runtime settings from the store")?;
    // The store's `catalog` setting, once set, wins over the start-up flag.
    let snap = config.current();
    let builtin_name = if snap.entries["catalog"].source == "store" {
        snap.catalog.clone()
    } else {
        s.catalog.clone()
    };
    let builtin = Arc::new(control::BuiltinCatalog::new(&builtin_name)?);
    let upstream_tls = match &s.upstream_ca {
        Some(f) => haven_federation::UpstreamTls::with_ca_file(f)
            .map_err(|e| anyhow::anyhow!("upstream_ca: {e}"))?,
        None => haven_federation::UpstreamTls::default(),
    };
    let upstreams = haven_federation::Upstreams::start_with_options(
        store.clone(),
        Arc::new(secrets.clone()),
        config.upstream_settings(),
        upstream_tls,
        s.hold_upstreams,
    );
    let catalog = Arc::new(haven_federation::FederatedCatalog::new(
        upstreams.clone(),
        builtin.clone(),
    ));
    // A multi-region node settles others' work only once it has heard every other region
    // (a takeover of this region's work made elsewhere is applied first).
    let recovery_gate = regions
        .clone()
        .map(|r: Arc<haven_cluster::regions::Regions>| {
            haven_mcp::engine::RecoveryGate(Arc::new(move || r.heard_all()))
        });
    // Before a session or task is answered as not found: catch up with the other regions
    // (at most 2 s), and look again. A region this one could not catch up with counts only
    // while it was heard within the last minute: one silent longer serves no client (and a
    // region lost for good must not make every unknown session "retry later" forever).
    let region_sync = regions
        .clone()
        .map(|r: Arc<haven_cluster::regions::Regions>| {
            haven_mcp::engine::RegionSync(Arc::new(move || {
                let r = r.clone();
                Box::pin(async move {
                    let behind = r
                        .catch_up_with_peers(std::time::Duration::from_secs(2))
                        .await;
                    behind
                        .into_iter()
                        .filter(|p| {
                            r.silent_for(p)
                                .is_some_and(|d| d < std::time::Duration::from_secs(60))
                        })
                        .collect()
                })
            }))
        });
    let region_lease = regions.as_ref().and_then(|r| r.lease());
    let client_limits = Arc::new(haven_mcp::limits::ClientLimits::default());
    let policy = haven_auth::Policy::follow(store.clone())
        .await
        .context("reading the authorization rules")?;
    let engine_config = EngineConfig {
        recovery_gate,
        region_sync,
        region_lease,
        node_id: node,
        legacy_responses: s.legacy_responses,
        session_ttl: std::time::Duration::from_secs(s.session_ttl_secs),
        max_clock_skew: s.max_clock_skew,
        presence,
        page_size: s.page_size,
        limits: client_limits.clone(),
        audit: Some(audit.clone()),
        policy: Some(policy.clone()),
        ..EngineConfig::default()
    };
    let engine = Engine::start(store.clone(), catalog, engine_config, secrets.clone())
        .await
        .context("starting the protocol engine")?;
    if let Some(r) = &regions {
        // A failed region's claimable work is claimed here once its lease has run out.
        let engine = engine.clone();
        r.set_takeover_handler(Arc::new(move |region: String| {
            let engine = engine.clone();
            Box::pin(async move {
                engine
                    .take_over_region(&region, true)
                    .await
                    .map_err(|e| e.to_string())
            })
        }));
    }
    let in_force = Arc::new(parking_lot::RwLock::new(config.current()));
    let control = control::Control {
        config,
        registry: haven_control::registry::Registry::new(store.clone()),
        api_keys: haven_auth::ApiKeys::new(store.clone()),
        rules: haven_auth::Rules::new(store.clone()),
        policy,
        secrets,
        upstreams,
        max_body_bytes: Arc::new(std::sync::atomic::AtomicUsize::new(s.max_body_bytes)),
        conn_limits: Arc::default(),
        client_limits,
        admission: Arc::default(),
        rate: Arc::default(),
        reclaim: Arc::default(),
        in_force,
        regions,
        audit,
    };
    control::apply_config(
        &control,
        store.clone(),
        builtin,
        Some(log),
        control::StartupValues {
            log_level: s.log_level.clone(),
            max_body_bytes: s.max_body_bytes,
            catalog: s.catalog.clone(),
        },
    );
    Ok((engine, store, control))
}

/// Refuses a multi-region node whose NATS servers are not in the JetStream domain named
/// after its region: another region's servers, or servers without a domain, would take this
/// region's stream (and other regions would not find it).
pub(crate) async fn check_domain(
    servers: &[String],
    region: &str,
    tls: &haven_state::NatsTls,
) -> Result<()> {
    let domain = haven_state::nats_store::server_domain(servers, tls)
        .await
        .map_err(|e| anyhow::anyhow!("asking the NATS servers for their JetStream domain: {e}"))?;
    match domain.as_deref() {
        Some(d) if d == region => Ok(()),
        Some(d) => bail!(
            "the NATS servers given to region {region} are in JetStream domain {d:?}, not {region:?}: these are region {d}'s servers, or the region's name is wrong (a region's name is also its JetStream domain: jetstream {{ domain: {region} }})"
        ),
        None => bail!(
            "the NATS servers given to region {region} have no JetStream domain; with --peer-regions each region's servers need jetstream {{ domain: {region} }} (a region's name is also its domain)"
        ),
    }
}

/// The secrets service with its key-encryption keys: from --secrets-key-file and/or
/// HAVEN_SECRETS_KEYS; on an embedded store without either, from DATA/secrets.keys (created on
/// first start). Nodes sharing a store must share keys, so a NATS store requires them.
async fn open_secrets(s: &Settings, store: &Arc<dyn Store>) -> Result<haven_secrets::Secrets> {
    use haven_secrets::{KekRing, KekSource, Secrets};
    let env = std::env::var("HAVEN_SECRETS_KEYS")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let configured = s.secrets_key_command.is_some() || env.is_some();
    let file = match &s.secrets_key_file {
        Some(f) => Some(f.clone()),
        None if configured => None,
        None => {
            if store.shared() {
                bail!(
                    "a shared (NATS) store needs the same secrets keys on every node: create a key file once with `haven secrets new-key --key-file FILE`, copy it to every node and pass --secrets-key-file FILE (or --secrets-key-command COMMAND that prints it, or set HAVEN_SECRETS_KEYS)"
                );
            }
            let f = s.data.join("secrets.keys");
            if !f.exists() {
                // A store that already holds user secrets (a restored or moved data directory)
                // needs the keys they were wrapped under: a new key could not read them.
                let existing = user_secret_names(store, 1).await?;
                if let Some(name) = existing.first() {
                    bail!(
                        "the store holds secrets (e.g. '{name}') but {} is missing: copy the key file you kept for this deployment there, or pass --secrets-key-file FILE",
                        f.display()
                    );
                }
                KekRing::create_file(&f)
                    .with_context(|| format!("creating the secrets key file {}", f.display()))?;
                tracing::info!(
                    "created the secrets key file {} (keep a copy outside the data directory: backups do not hold it)",
                    f.display()
                );
            }
            Some(f)
        }
    };
    let source = KekSource {
        file,
        command: s.secrets_key_command.clone(),
        env,
    };
    // Reading the keys may run a key command: off the async threads.
    let opening = store.clone();
    let secrets = tokio::task::spawn_blocking(move || Secrets::open(opening, source))
        .await
        .context("loading the secrets keys")?
        .context("loading the secrets keys")?;
    // Secrets wrapped under a key this node does not have would fail on first use: refuse
    // now, while the fix (the right key file) is obvious.
    let known = secrets.known_kids();
    let user: Vec<_> = secrets
        .list()
        .await
        .context("reading the secrets")?
        .into_iter()
        .filter(|m| !haven_secrets::is_reserved(&m.name))
        .collect();
    let foreign: Vec<String> = user
        .iter()
        .filter(|m| !known.contains(&m.kek))
        .map(|m| format!("'{}' (key {})", m.name, m.kek))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "the store holds secrets wrapped under key-encryption keys this node's key file does not have: {}; start with the key file they were written with (it may hold several keys), then rotate",
            foreign.join(", ")
        );
    }
    // A key of the right id but the wrong material shows only when it unwraps: try one
    // secret per key.
    let mut tried = std::collections::BTreeSet::new();
    for m in &user {
        if tried.insert(m.kek.clone())
            && let Err(e) = secrets.get(&m.name).await
        {
            bail!(
                "key-encryption key {} of this node's key file does not open secret '{}' ({e}); start with the key file the secrets were written with",
                m.kek,
                m.name
            );
        }
    }
    Ok(secrets)
}

/// Up to `limit` names of user (not `system/`) secrets in the store.
async fn user_secret_names(store: &Arc<dyn Store>, limit: usize) -> Result<Vec<String>> {
    let records = store
        .scan_all(haven_secrets::SECRETS_NS, "")
        .await
        .context("reading the secrets")?;
    Ok(records
        .into_iter()
        .map(|r| r.record.key)
        .filter(|k| !haven_secrets::is_reserved(k))
        .take(limit)
        .collect())
}

/// Starts continuous backup when configured. A bad URL or key fails the start; an
/// unreachable target does not (shipping retries and its lag shows in the status).
async fn start_backup(
    s: &Settings,
    store: Arc<dyn Store>,
) -> Result<Vec<haven_backup::ShipperHandle>> {
    let Some(b) = &s.backup else {
        return Ok(Vec::new());
    };
    // Reading the key may run a key command: off the async threads.
    let source = b.key.clone();
    let key = tokio::task::spawn_blocking(move || source.backup_key())
        .await
        .context("reading the backup key")??;
    let mut handles = Vec::new();
    for url in std::iter::once(&b.url).chain(&b.also) {
        let mut config = haven_backup::BackupConfig::new(url.clone(), key.clone());
        config.interval = b.interval;
        config.snapshot_interval = b.snapshot_interval;
        config.verify_interval = b.verify_interval;
        config.prune_interval = b.prune_interval;
        config.retention = b.retention.clone();
        if *url != b.url {
            // A stable label per location: its own lease, generation record and state file.
            config.label = Some(label_of(url));
        }
        let handle = haven_backup::Shipper::start(
            store.clone(),
            config,
            &s.data,
            Arc::new(haven_state::SystemClock),
        )
        .await
        .with_context(|| format!("starting backup to {url}"))?;
        tracing::info!(
            "backing up to {url} every {:?} (snapshots every {:?})",
            b.interval,
            b.snapshot_interval
        );
        handles.push(handle);
    }
    Ok(handles)
}

/// An address a local client can connect to: a wildcard address becomes loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// A short stable name of a backup location (FNV-1a of its URL).
fn label_of(url: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h >> 32)
}

/// Refuses the key and token files given in the settings when group or others may read or
/// change them, before anything is created or opened (the files Haven keeps in the data
/// directory are checked when they are read).
fn check_key_files(s: &Settings) -> Result<()> {
    let files = [
        (s.secrets_key_file.as_deref(), "secrets key file"),
        (s.admin_token_file.as_deref(), "admin token file"),
        (
            s.backup.as_ref().and_then(|b| match &b.key {
                settings::KeySource::File(f) => Some(f.as_path()),
                settings::KeySource::Command(_) => None,
            }),
            "backup key file",
        ),
        (s.tls.as_ref().map(|t| t.key.as_path()), "TLS key file"),
        (
            s.admin_tls.as_ref().map(|t| t.key.as_path()),
            "TLS key file",
        ),
        (
            s.nats_tls.identity.as_ref().map(|i| i.key.as_path()),
            "TLS client key file",
        ),
    ];
    for (file, what) in files {
        if let Some(f) = file.filter(|f| f.exists()) {
            haven_state::files::check_private_file(f, what)?;
        }
    }
    Ok(())
}

async fn serve(s: Settings, log: control::LogReloader) -> Result<()> {
    check_key_files(&s)?;
    // The admin token next: one that others may read stops the start before the store is
    // opened.
    haven_state::files::private_dir(&s.data)
        .with_context(|| format!("creating the data directory {}", s.data.display()))?;
    let (token, token_file) = admin::load_or_create_token(&s.data, s.admin_token_file.as_deref())?;
    // The TLS pairs next: a broken one stops the start before the store is opened.
    let tls = load_tls(s.tls.as_ref(), s.tls_min_version, "tls")?;
    let admin_tls = match (&s.admin_tls, &tls) {
        (Some(f), Some(t)) if t.files() == f => Some(t.clone()),
        (f, _) => load_tls(f.as_ref(), s.tls_min_version, "admin_tls")?,
    };
    let (engine, store, control) = start_engine(&s, log).await?;
    // On a shared store a token from the data directory is the region's: one token for
    // every node (a token given by --admin-token-file or HAVEN_ADMIN_TOKEN is used as is).
    let token = if s.nats.is_some() && token_file == s.data.join("admin.token") {
        admin::region_token(&control.secrets, &s.region, token, &token_file).await?
    } else {
        token
    };
    let backup = start_backup(&s, store.clone()).await?;
    reclaim::start(
        store,
        backup.clone(),
        s.peer_regions.clone(),
        control.in_force.clone(),
        control.reclaim.clone(),
    );
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("listening on {}", s.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let admin_listener = match &s.admin_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("listening on {a} (admin_listen, the admin API)"))?,
        ),
        None => None,
    };
    let metrics_listener = match &s.metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("listening on {a} (metrics_listen, /metrics)"))?,
        ),
        None => None,
    };
    let admin_addr = match &admin_listener {
        Some(l) => l.local_addr()?,
        None => addr,
    };
    let authentication = authentication(&s, &control).await?;
    // Shedding by delay (limits.max_queue_delay_ms) needs the runtime's delay measured.
    control
        .admission
        .start_delay_probe(tokio::runtime::Handle::current())?;
    let http = haven_server::HttpConfig {
        max_body_bytes: control.max_body_bytes.clone(),
        allowed_hosts: s.allowed_hosts.clone(),
        limits: control.conn_limits.clone(),
        admission: control.admission.clone(),
        authentication,
        rate: control.rate.clone(),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Without a listener of its own the admin API is served on the MCP listener (its TLS).
    let admin_scheme = match (&admin_listener, &tls, &admin_tls) {
        (None, Some(_), _) | (Some(_), _, Some(_)) => "https",
        _ => "http",
    };
    let mut watchers = Vec::new();
    for t in
        tls.iter().chain(admin_tls.iter().filter(|a| {
            !tls.as_ref().is_some_and(|t| Arc::ptr_eq(t, a)) && admin_listener.is_some()
        }))
    {
        watchers.push(t.watch(TLS_RELOAD_INTERVAL));
    }
    tracing::info!(
        "haven listening on {scheme}://{addr}/mcp (data: {}, catalog: {}, node: {})",
        s.data.display(),
        s.catalog,
        engine.config().node_id
    );
    tracing::info!(
        "admin API at {admin_scheme}://{admin_addr}/admin/v1 (token in {})",
        token_file.display()
    );
    // Where the CLI finds the admin API when it is not told (`--node`).
    let admin_url = format!("{admin_scheme}://{}", connectable(admin_addr));
    haven_state::files::write_private(&s.data.join("admin.url"), admin_url.as_bytes())
        .with_context(|| format!("writing {}", s.data.join("admin.url").display()))?;
    let (admin_routes, open_metrics) = admin::router(
        admin::Access {
            token,
            allowed: haven_server::layers::host_origin::AllowedHosts::new(&s.allowed_hosts),
            authn: http
                .authentication
                .as_ref()
                .map(|a| a.authenticator.clone()),
        },
        backup,
        engine.clone(),
        s.region.clone(),
        control.clone(),
        status::StatusConfig {
            alerts_url: s.alerts_url.clone(),
            secure_cookie: admin_scheme == "https",
        },
    );
    // `/mcp` goes straight to its handler; every other path through the router.
    let mut app = haven_server::app(engine.clone(), http.clone()).merge(admin::regionz_router(
        engine.clone(),
        s.region.clone(),
        control.regions.clone(),
    ));
    if admin_listener.is_none() {
        app = app.merge(admin_routes.clone());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // SIGTERM: drain. /readyz answers 503 at once (load balancers stop sending), open legacy
    // streams end with a reconnection hint, running requests get up to --drain-timeout.
    let drain = {
        let engine = engine.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("draining");
            engine.begin_drain().await;
            let _ = stop_tx.send(true);
        }
    };
    let grace = s.drain_timeout;
    // The admin API on its own listener stops with the MCP listener.
    let admin_server = admin_listener.map(|l| {
        let http = http.clone();
        let mut stop = stop_rx.clone();
        let admin_tls = admin_tls.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            haven_server::serve_tls(l, admin_routes, &http, admin_tls.as_deref(), stopped, grace)
                .await
        })
    });
    // /metrics without credentials on its own listener, stopped with the MCP listener.
    let metrics_server = metrics_listener.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics at http://{a}/metrics (no credentials)");
        }
        let http = http.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            haven_server::serve_tls(l, open_metrics, &http, None, stopped, grace).await
        })
    });
    // While draining, the listener answers (`/readyz`: 503 draining) until the running
    // requests ended and their connections closed, or `grace` passed.
    let settled = {
        let engine = engine.clone();
        async move {
            while engine.running_requests() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    haven_server::serve_tls_until_settled(
        listener,
        app,
        &http,
        tls.as_deref(),
        drain,
        settled,
        grace,
    )
    .await?;
    if let Some(m) = metrics_server {
        match m.await {
            Ok(r) => r.context("serving /metrics")?,
            Err(e) => tracing::warn!("the metrics server ended abnormally: {e}"),
        }
    }
    for w in watchers {
        w.abort();
    }
    if let Some(a) = admin_server {
        match a.await {
            Ok(r) => r.context("serving the admin API")?,
            Err(e) => tracing::warn!("the admin API's server ended abnormally: {e}"),
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    while engine.running_requests() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if engine.running_requests() > 0 {
        tracing::warn!(
            running = engine.running_requests(),
            "drain deadline reached; other nodes take over what is left"
        );
    }
    engine.leave().await;
    close_upstreams(&control).await;
    if let Err(e) = control.audit.close().await {
        tracing::warn!(error = %e, "closing the audit log");
    }
    tracing::info!("haven stopped");
    Ok(())
}

/// Authentication of `/mcp`, as the settings ask (`None`: off). The issuer's keys are fetched
/// now, so that a wrong issuer is seen at start; if the issuer cannot be reached the node
/// starts anyway (and says so) and fetches them at the first token.
async fn authentication(
    s: &Settings,
    control: &control::Control,
) -> Result<Option<Arc<haven_server::layers::authn::Authentication>>> {
    let Some(a) = &s.auth else {
        let loopback = s
            .listen
            .parse::<SocketAddr>()
            .map(|a| a.ip().is_loopback())
            .unwrap_or(s.listen.starts_with("localhost:"));
        if !loopback {
            tracing::warn!(
                listen = %s.listen,
                "authentication is off on a listener that is not loopback: anyone who reaches it can call every tool (see \"Securing Haven\" in the README)"
            );
        }
        return Ok(None);
    };
    let oauth = match &a.oauth {
        Some(o) => {
            let v = haven_auth::TokenValidator::new(o.clone(), haven_auth::oauth::system_now())
                .map_err(|e| anyhow::anyhow!("OAuth settings: {e}"))?;
            if let Err(e) = v.prefetch().await {
                tracing::warn!(issuer = %o.issuer, error = %e, "the issuer's keys could not be fetched at start; tokens are refused with 503 until they can");
            }
            Some(Arc::new(v))
        }
        None => None,
    };
    // API keys are always accepted when authentication is on.
    let keys: Arc<dyn haven_auth::KeyVerifier> = Arc::new(control.api_keys.clone());
    let authenticator =
        haven_auth::Authenticator::new(oauth, Some(keys), a.required_scopes.clone(), Vec::new());
    tracing::info!(
        resource = %a.resource,
        issuer = a.oauth.as_ref().map(|o| o.issuer.as_str()).unwrap_or("(none: API keys only)"),
        "authentication is on for /mcp"
    );
    Ok(Some(Arc::new(
        haven_server::layers::authn::Authentication {
            authenticator: Arc::new(authenticator),
            resource: a.resource.clone(),
            audit: Some(control.audit.clone()),
        },
    )))
}

/// How often the TLS certificate and key files are checked for a change.
const TLS_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A listener's TLS from `files` (`None`: plain HTTP); `name` is the settings' prefix.
fn load_tls(
    files: Option<&haven_server::TlsFiles>,
    min: haven_server::MinVersion,
    name: &str,
) -> Result<Option<Arc<haven_server::ServerTls>>> {
    let Some(f) = files else {
        return Ok(None);
    };
    let tls = haven_server::ServerTls::load(f.clone(), min)
        .map_err(|e| anyhow::anyhow!("{name}_cert / {name}_key: {e}"))?;
    tracing::info!(
        cert = %f.cert.display(),
        min_version = %min,
        "TLS on ({name}); the files are reloaded when they change"
    );
    Ok(Some(tls))
}

/// Closes this node's upstream connections (stdio children are ended and reaped), bounded.
async fn close_upstreams(control: &control::Control) {
    if tokio::time::timeout(
        std::time::Duration::from_secs(10),
        control.upstreams.shutdown(),
    )
    .await
    .is_err()
    {
        tracing::warn!("closing the upstream connections took more than 10 s; exiting anyway");
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn stdio(s: Settings, log: control::LogReloader) -> Result<()> {
    check_key_files(&s)?;
    let (engine, _, control) = start_engine(&s, log).await?;
    let served =
        haven_server::stdio::serve_stdio(engine, tokio::io::stdin(), tokio::io::stdout()).await;
    close_upstreams(&control).await;
    if let Err(e) = control.audit.close().await {
        tracing::warn!(error = %e, "closing the audit log");
    }
    served?;
    Ok(())
}
