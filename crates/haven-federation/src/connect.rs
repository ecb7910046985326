//! Opening a connection to an upstream (stdio child process or Streamable HTTP) and the client
//! handler that receives the upstream's notifications and requests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use haven_control::config::UpstreamSettings;
use haven_control::redact::{Secrets, is_credential_name, redact};
use haven_control::registry::{Piece, Transport, UpstreamSpec, parse_template, served_uri};
use haven_mcp::RequestContext;
use haven_mcp::context::{Announcement, announce};
use haven_state::Store;
use parking_lot::Mutex;
use rmcp::ClientHandler;
use rmcp::model::{
    ClientCapabilities, ClientConfig, ClientResult, CreateMessageRequestParams,
    CreateMessageResult, ElicitRequestParams, ElicitResult, ErrorCode, ErrorData, Implementation,
    ListRootsResult, LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken,
    ProtocolVersion, ResourceUpdatedNotificationParam, ServerNotification, ServerRequest,
};
use rmcp::service::{
    NotificationContext, Peer, RequestContext as RmcpContext, RoleClient, RunningService,
};
use rmcp::transport::streamable_http_client::{
    StreamableHttpClientTransportConfig, StreamableHttpError,
};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Variables a stdio upstream inherits from Haven's environment (what MCP clients commonly
/// pass on: enough to find programs and a home directory); everything else it gets only
/// from its registry entry.
pub(crate) const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

use crate::SecretResolver;
use crate::failure::{Failure, Reason};

/// Requests in flight whose progress goes to a client: the progress token Haven's client put on
/// the upstream request → the calling client's context.
pub(crate) type ProgressMap = Arc<Mutex<HashMap<ProgressToken, RequestContext>>>;

/// Lines of a stdio upstream's stderr kept for operators (`haven registry show`).
const STDERR_LINES: usize = 20;
/// Bytes of stderr lines kept, at most.
const STDERR_BYTES: usize = 4096;
/// A longer stderr line is cut to this many bytes.
const STDERR_LINE_BYTES: usize = 512;

/// The last lines a stdio upstream wrote to its stderr, over its restarts, redacted: at most
/// [`STDERR_LINES`] lines and [`STDERR_BYTES`] bytes.
#[derive(Default)]
pub(crate) struct StderrTail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl StderrTail {
    /// Adds `line` (cut to [`STDERR_LINE_BYTES`]), dropping the oldest lines over the bounds.
    pub fn push(&mut self, mut line: String) {
        if line.len() > STDERR_LINE_BYTES {
            let mut end = STDERR_LINE_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > STDERR_LINES || self.bytes > STDERR_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The lines kept, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}

/// An open connection.
pub(crate) struct Opened {
    /// Sends requests to the upstream.
    pub peer: Peer<RoleClient>,
    /// Cancels the rmcp service (which closes the transport: the child process is closed,
    /// then killed, and reaped; the HTTP session is deleted).
    pub ct: CancellationToken,
    /// Cancelled once the service has ended and its transport is closed.
    pub done: CancellationToken,
    /// The child's process id (stdio).
    pub pid: Option<u32>,
    /// The HTTP client under the service (HTTP), which forwarded calls are sent with.
    pub http: Option<crate::http::UpstreamHttp>,
}

/// Receives what an upstream sends on its own: list changes, resource updates, progress, log
/// messages, and server-to-client requests (which it answers itself; see the crate doc).
#[derive(Clone)]
pub(crate) struct Handler {
    pub upstream: String,
    pub store: Arc<dyn Store>,
    /// Wakes the connection's list refresher.
    pub refresh: Arc<Notify>,
    pub progress: ProgressMap,
    /// The upstream's known secret values, removed from what it sends before it is forwarded
    /// to a client or logged.
    pub secrets: Arc<Mutex<Secrets>>,
    /// The last lines of a stdio upstream's stderr.
    pub stderr: Arc<Mutex<StderrTail>>,
}

impl Handler {
    fn redact(&self, text: &str) -> String {
        redact(text, &self.secrets.lock())
    }

    /// Relays an upstream's progress to the client whose call it is about.
    fn progress(&self, params: ProgressNotificationParam) {
        let ctx = self.progress.lock().get(&params.progress_token).cloned();
        if let Some(ctx) = ctx {
            let message = params.message.map(|m| self.redact(&m));
            ctx.progress(params.progress, params.total, message);
        }
    }

    fn logged(&self, params: LoggingMessageNotificationParam) {
        let data = self.redact(&params.data.to_string());
        tracing::debug!(upstream = %self.upstream, level = ?params.level, logger = ?params.logger, %data, "upstream log message");
    }

    async fn resource_updated(&self, params: ResourceUpdatedNotificationParam) {
        let uri = served_uri(&self.upstream, &params.uri);
        if let Err(e) = announce(&*self.store, &Announcement::ResourceUpdated(uri)).await {
            tracing::warn!(upstream = %self.upstream, error = %e, "could not announce a resource update");
        }
    }

    /// Takes a notification the upstream sent on the stream of a call sent without rmcp's
    /// service (`direct.rs`), as [`ClientHandler`] takes those rmcp receives.
    pub(crate) fn notified(&self, n: ServerNotification) {
        match n {
            ServerNotification::ProgressNotification(p) => self.progress(p.params),
            ServerNotification::LoggingMessageNotification(l) => self.logged(l.params),
            ServerNotification::ResourceUpdatedNotification(u) => {
                let handler = self.clone();
                tokio::spawn(async move { handler.resource_updated(u.params).await });
            }
            ServerNotification::ResourceListChangedNotification(_)
            | ServerNotification::ToolListChangedNotification(_)
            | ServerNotification::PromptListChangedNotification(_) => self.refresh.notify_one(),
            _ => {}
        }
    }

    /// The answer to a request the upstream sent on the stream of a call sent without
    /// rmcp's service, the one [`ClientHandler`] gives.
    pub(crate) fn answer(&self, request: &ServerRequest) -> Result<ClientResult, ErrorData> {
        match request {
            ServerRequest::PingRequest(_) => Ok(ClientResult::empty(())),
            ServerRequest::CreateMessageRequest(_) => Err(refused("sampling")),
            ServerRequest::ListRootsRequest(_) => {
                Ok(ClientResult::ListRootsResult(ListRootsResult::default()))
            }
            ServerRequest::ElicitRequest(_) => Err(refused("elicitation")),
            ServerRequest::CustomRequest(r) => Err(ErrorData::new(
                ErrorCode::METHOD_NOT_FOUND,
                format!("method not found: {}", r.method),
                None,
            )),
            _ => Err(ErrorData::new(
                ErrorCode::METHOD_NOT_FOUND,
                "method not found",
                None,
            )),
        }
    }
}

fn refused(what: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode::METHOD_NOT_FOUND,
        format!("Haven does not relay {what} requests from upstream servers"),
        None,
    )
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        // Haven talks to upstreams in the legacy era (initialize + session), newest version.
        let mut config = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("haven", env!("CARGO_PKG_VERSION")),
        );
        config.protocol_version = ProtocolVersion::LATEST_WITH_INITIALIZE;
        config
    }

    async fn create_message(
        &self,
        _params: CreateMessageRequestParams,
        _context: RmcpContext<RoleClient>,
    ) -> Result<CreateMessageResult, ErrorData> {
        Err(refused("sampling"))
    }

    async fn list_roots(
        &self,
        _context: RmcpContext<RoleClient>,
    ) -> Result<ListRootsResult, ErrorData> {
        Ok(ListRootsResult::default())
    }

    async fn create_elicitation(
        &self,
        _request: ElicitRequestParams,
        _context: RmcpContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        Err(refused("elicitation"))
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress(params);
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.logged(params);
    }

    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.resource_updated(params).await;
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.refresh.notify_one();
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.refresh.notify_one();
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.refresh.notify_one();
    }
}

/// The secret values `spec` names without the secrets service: its URL's password (and
/// credential-like query values), and literal values of credential-like headers and
/// environment variables.
pub(crate) fn literal_secrets(spec: &UpstreamSpec) -> Secrets {
    let mut known = Secrets::new();
    let values = match &spec.transport {
        Transport::Http { url, headers } => {
            known.add_url(url);
            headers
        }
        Transport::Stdio { env, .. } => env,
    };
    for (k, v) in values {
        if is_credential_name(k) {
            known.add_credential(v);
        }
    }
    known
}

/// Expands the secret references of `template`, adding every secret value it holds (and the
/// whole value, when it references one) to `known`.
async fn expand(
    template: &str,
    credential: bool,
    resolver: &dyn SecretResolver,
    known: &Mutex<Secrets>,
) -> Result<String, String> {
    let pieces = parse_template(template).map_err(|e| e.to_string())?;
    let mut referenced = false;
    for p in &pieces {
        if let Piece::Secret(name) = p {
            referenced = true;
            let value = resolver.expand(&format!("${{secret:{name}}}")).await?;
            known.lock().add(&value);
        }
    }
    let value = resolver.expand(template).await?;
    if referenced || credential {
        known.lock().add_credential(&value);
    }
    Ok(value)
}

/// Which certificates https:// upstreams are verified against: the system's roots, and the
/// CA certificates of a file given to the node (`--upstream-ca`). Plain http:// upstreams are
/// not affected.
#[derive(Clone, Debug, Default)]
pub struct UpstreamTls {
    /// `None`: the platform's verifier with the system's roots (`platform`).
    config: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The platform's verifier with the system's roots, when `config` is `None`: built once
    /// for the node and shared by every HTTP upstream's clients (loading the roots cost about
    /// as much as 150 forwarded calls). `None` inside if it could not be built: reqwest then
    /// builds its own, and posts the forwarded calls too.
    platform: std::sync::Arc<std::sync::OnceLock<Option<rustls::ClientConfig>>>,
}

impl UpstreamTls {
    /// The system's roots and the CA certificates of the PEM file `path` (at least one).
    pub fn with_ca_file(path: &std::path::Path) -> Result<UpstreamTls, String> {
        let roots = haven_state::tls::root_store_with_system(path)?;
        let config = rustls::ClientConfig::builder_with_provider(haven_state::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(UpstreamTls {
            config: Some(std::sync::Arc::new(config)),
            platform: Default::default(),
        })
    }

    /// What https:// upstreams are verified with, by reqwest and by hyper's client for the
    /// forwarded calls (`http.rs`); no ALPN, so HTTP/1.1. `None` if the platform's verifier
    /// cannot be built.
    fn client_config(&self) -> Option<rustls::ClientConfig> {
        if let Some(config) = &self.config {
            return Some((**config).clone());
        }
        self.platform
            .get_or_init(|| {
                use rustls_platform_verifier::BuilderVerifierExt;
                let built = rustls::ClientConfig::builder_with_provider(
                    haven_state::tls::provider(),
                )
                .with_safe_default_protocol_versions()
                .and_then(|b| b.with_platform_verifier())
                .map(|b| b.with_no_client_auth());
                built
                    .map_err(|e| tracing::warn!(error = %e, "the platform's TLS verifier could not be built; reqwest verifies upstreams with its own"))
                    .ok()
            })
            .clone()
    }
}

/// Opens a connection to `spec` and completes the MCP handshake. The caller bounds the time.
/// Every secret value expanded for it is added to `handler.secrets` first.
pub(crate) async fn open(
    spec: &UpstreamSpec,
    handler: Handler,
    secrets: &dyn SecretResolver,
    settings: &UpstreamSettings,
    tls: &UpstreamTls,
) -> Result<Opened, Failure> {
    let ct = CancellationToken::new();
    let ((running, pid), http) = match &spec.transport {
        Transport::Stdio {
            command,
            args,
            env,
            cwd,
        } => {
            let process = Process {
                name: &spec.name,
                command,
                args,
                env,
                cwd: cwd.as_deref(),
            };
            (
                open_stdio(process, handler, secrets, ct.clone()).await?,
                None,
            )
        }
        Transport::Http { url, headers } => {
            // An entry stored before URL credentials and an Authorization header were refused
            // together: the URL's credentials win (reqwest sends them as `Authorization:
            // Basic`), and the header is left out rather than sent a second time.
            let skip_authorization = spec.credentials_conflict().is_some();
            let target = HttpTarget {
                url,
                headers,
                skip_authorization,
            };
            let (running, http) =
                open_http(target, handler, secrets, settings, tls, ct.clone()).await?;
            (running, Some(http))
        }
    };
    let peer = running.peer().clone();
    let done = CancellationToken::new();
    tokio::spawn({
        let done = done.clone();
        async move {
            let reason = running.waiting().await;
            tracing::debug!(?reason, "upstream connection ended");
            done.cancel();
        }
    });
    Ok(Opened {
        peer,
        ct,
        done,
        pid,
        http,
    })
}

/// A connection the upstream serves, and the process id of a stdio upstream.
type Running = (RunningService<RoleClient, Handler>, Option<u32>);

/// How a stdio upstream is started.
struct Process<'a> {
    name: &'a str,
    command: &'a str,
    args: &'a [String],
    env: &'a BTreeMap<String, String>,
    cwd: Option<&'a str>,
}

/// Where a Streamable HTTP upstream is and what it is sent.
struct HttpTarget<'a> {
    url: &'a str,
    headers: &'a BTreeMap<String, String>,
    /// Leave the configured `Authorization` header out (see [`open`]).
    skip_authorization: bool,
}

/// Starts a stdio upstream (in a clean environment; its stderr to the log at debug level and
/// its last lines kept for the admin API) and completes the MCP handshake over its
/// stdin/stdout.
async fn open_stdio(
    p: Process<'_>,
    handler: Handler,
    secrets: &dyn SecretResolver,
    ct: CancellationToken,
) -> Result<Running, Failure> {
    let Process {
        name,
        command,
        args,
        env,
        cwd,
    } = p;
    let mut cmd = tokio::process::Command::new(command);
    cmd.args(args).kill_on_drop(true);
    // A stdio upstream gets a clean environment: the few variables a program needs
    // to run, then its configured ones; never Haven's own (keys, tokens, cloud
    // credentials).
    cmd.env_clear();
    for k in INHERITED_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    for (k, v) in env {
        let value = expand(v, is_credential_name(k), secrets, &handler.secrets)
            .await
            .map_err(|e| {
                Failure::new(
                    Reason::Misconfigured,
                    format!("environment variable {k}: {e}"),
                )
            })?;
        cmd.env(k, value);
    }
    if let Some(dir) = cwd {
        if !std::path::Path::new(dir).is_dir() {
            return Err(Failure::new(
                Reason::Misconfigured,
                format!("the working directory '{dir}' does not exist"),
            ));
        }
        cmd.current_dir(dir);
    }
    let (child, stderr) = TokioChildProcess::builder(cmd)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Failure::new(
                Reason::Unreachable,
                format!("cannot start '{command}': {e}"),
            )
        })?;
    let pid = child.id();
    if let Some(stderr) = stderr {
        let name = name.to_owned();
        let known = handler.secrets.clone();
        let tail = handler.stderr.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line = redact(&line, &known.lock());
                tracing::debug!(upstream = %name, "stderr: {line}");
                tail.lock().push(line);
            }
        });
    }
    let running = rmcp::service::serve_client_with_ct(handler, child, ct)
        .await
        .map_err(|e| Failure::from_error("MCP handshake failed", &e))?;
    Ok((running, pid))
}

/// Connects to a Streamable HTTP upstream with its configured headers (secret references
/// expanded now) and completes the MCP handshake.
async fn open_http(
    target: HttpTarget<'_>,
    handler: Handler,
    secrets: &dyn SecretResolver,
    settings: &UpstreamSettings,
    tls: &UpstreamTls,
    ct: CancellationToken,
) -> Result<(Running, crate::http::UpstreamHttp), Failure> {
    let misconfigured = |detail: String| Failure::new(Reason::Misconfigured, detail);
    let mut custom = HashMap::new();
    for (k, v) in target.headers {
        if target.skip_authorization && k.eq_ignore_ascii_case("authorization") {
            continue;
        }
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| misconfigured(format!("'{k}' is not a valid header name")))?;
        let value = expand(v, is_credential_name(k), secrets, &handler.secrets)
            .await
            .map_err(|e| misconfigured(format!("header {k}: {e}")))?;
        let mut value = http::HeaderValue::from_str(&value).map_err(|_| {
            misconfigured(format!("header {k}: the value is not a valid header value"))
        })?;
        value.set_sensitive(true);
        custom.insert(name, value);
    }
    let connect_timeout = Duration::from_millis(settings.connect_timeout_ms);
    let tls_config = tls.client_config();
    let mut client = reqwest::Client::builder().connect_timeout(connect_timeout);
    if let Some(config) = &tls_config {
        client = client.tls_backend_preconfigured(config.clone());
    }
    let client = client
        .build()
        .map_err(|e| Failure::from_error("cannot build an HTTP client", &e))?;
    let config = StreamableHttpClientTransportConfig::with_uri(target.url)
        .custom_headers(custom)
        .reinit_on_expired_session(true);
    let poster = tls_config.and_then(|t| crate::http::Poster::new(target.url, t, connect_timeout));
    let http = crate::http::UpstreamHttp::new(client, target.url, poster);
    let transport = StreamableHttpClientTransport::with_client(http.clone(), config);
    let running = rmcp::service::serve_client_with_ct(handler, transport, ct)
        .await
        .map_err(|e| Failure::from_error("MCP handshake failed", &e))?;
    Ok(((running, None), http))
}

/// Whether a failed send provably never reached the upstream: the connection was refused, or
/// the session was gone (HTTP 404) and could not be re-opened.
pub(crate) fn not_delivered(error: &rmcp::service::ServiceError) -> bool {
    let rmcp::service::ServiceError::TransportSend(e) = error else {
        return false;
    };
    never_reached(e.error.as_ref())
}

/// Whether an HTTP send's error (or one of its sources) says the request never reached the
/// upstream (see [`not_delivered`]).
pub(crate) fn never_reached(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            if crate::http::PostFailure::of(http).is_some_and(|f| f.is_connect()) {
                return true;
            }
            match http {
                StreamableHttpError::Client(c) if c.is_connect() => return true,
                StreamableHttpError::SessionExpired
                | StreamableHttpError::ReinitializationFailed(_) => return true,
                _ => {}
            }
        }
        if let Some(c) = err.downcast_ref::<reqwest::Error>()
            && c.is_connect()
        {
            return true;
        }
        source = err.source();
    }
    false
}
