//! The rmcp reference server for Haven's benchmarks: rmcp 3.x's Streamable HTTP server
//! (`StreamableHttpService` under axum, `TCP_NODELAY` on every connection) exposing one tool,
//! `echo` {text} -> a text content equal to `text`.
//!
//! `--mode stateless` disables legacy sessions (every request is served statelessly, which is
//! how rmcp serves 2026-07-28 clients); `--mode stateful` keeps legacy sessions in process
//! memory (`LocalSessionManager`) and still serves 2026-07-28 requests statelessly.
//! `--response json` sets rmcp's `json_response` so stateless replies are plain JSON; legacy
//! session replies are always SSE in rmcp.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::serve::ListenerExt;
use clap::{Parser, ValueEnum};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// How rmcp routes requests.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// No legacy sessions: every request is served statelessly.
    Stateless,
    /// In-memory legacy sessions (2026-07-28 requests are still served statelessly).
    Stateful,
}

/// How stateless replies are framed.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ResponseFormat {
    /// `json_response = true`: a plain JSON body when the handler answers at once.
    Json,
    /// `json_response = false`: an SSE stream carrying the response.
    Sse,
}

/// Command-line flags of the reference server.
#[derive(Parser, Debug)]
#[command(about = "rmcp 3.x reference MCP server with one `echo` tool, for benchmarks")]
struct Args {
    /// Address to listen on (loopback only for benchmarks).
    #[arg(long, default_value = "127.0.0.1:8931")]
    listen: SocketAddr,
    /// Session mode.
    #[arg(long, value_enum, default_value = "stateless")]
    mode: Mode,
    /// Framing of stateless replies (legacy session replies are always SSE in rmcp).
    #[arg(long, value_enum, default_value = "json")]
    response: ResponseFormat,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// HTTP path of the MCP endpoint.
    #[arg(long, default_value = "/mcp")]
    path: String,
}

/// Arguments of the `echo` tool.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct EchoArgs {
    /// The text to return.
    text: String,
}

/// The reference server: one `echo` tool routed by rmcp's tool macros.
#[derive(Clone)]
struct EchoServer {
    tool_router: Arc<ToolRouter<EchoServer>>,
}

static ROUTER: OnceLock<Arc<ToolRouter<EchoServer>>> = OnceLock::new();

impl EchoServer {
    /// A handler sharing the process-wide tool router (built once, not per request).
    fn shared() -> Self {
        Self {
            tool_router: ROUTER.get_or_init(|| Arc::new(Self::tool_router())).clone(),
        }
    }
}

#[tool_router]
impl EchoServer {
    /// Returns the input text as a single text content.
    #[tool(description = "Echo the given text back")]
    async fn echo(&self, Parameters(args): Parameters<EchoArgs>) -> String {
        args.text
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for EchoServer {}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads);
    }
    builder.build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(matches!(args.mode, Mode::Stateful))
        .with_json_response(matches!(args.response, ResponseFormat::Json))
        .with_cancellation_token(shutdown.child_token());
    let service: StreamableHttpService<EchoServer, LocalSessionManager> =
        StreamableHttpService::new(
            || Ok(EchoServer::shared()),
            Arc::new(LocalSessionManager::default()),
            config,
        );
    let router = axum::Router::new().nest_service(&args.path, service);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    eprintln!(
        "rmcp-reference listening on http://{}{} (mode {:?}, response {:?})",
        args.listen, args.path, args.mode, args.response
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
