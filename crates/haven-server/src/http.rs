//! The Streamable HTTP transport: routes, the accept loop, health endpoints, and the handler of
//! `/mcp`, which only reads the request and dispatches it to the engine. The HTTP-level checks
//! run before it (`layers`); the engine's answer becomes HTTP in one place (`response`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use haven_auth::Principal;
use haven_mcp::engine::{
    Engine, LegacyPost, Rejection, Reply, StatelessHeaders, StatelessPost, TraceHeaders,
    is_stateless,
};
use haven_mcp::jsonrpc;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

use crate::layers::{Admitted, body_limit, host_origin, rate};
use crate::names;
use crate::response::{Era, respond, respond_in};

/// HTTP settings.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes. Shared, so that a configuration change
    /// applies to the next request without a restart.
    pub max_body_bytes: Arc<AtomicUsize>,
    /// Host names (without port) allowed in `Host` and `Origin`; `*` allows any.
    pub allowed_hosts: Vec<String>,
    /// Connection caps and timeouts, shared like the body limit.
    pub limits: Arc<crate::conn::ConnLimits>,
    /// Requests served at once, per node and per session.
    pub admission: Arc<crate::layers::admission::Admission>,
    /// Authentication of `/mcp` (`None`: off, every caller is anonymous).
    pub authentication: Option<Arc<crate::layers::authn::Authentication>>,
    /// Request rates per client address, per principal and per tool.
    pub rate: Arc<crate::rate::RateLimiter>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: Arc::new(AtomicUsize::new(4 * 1024 * 1024)),
            allowed_hosts: vec![
                "localhost".into(),
                "127.0.0.1".into(),
                "[::1]".into(),
                "::1".into(),
            ],
            limits: Arc::default(),
            admission: Arc::default(),
            authentication: None,
            rate: Arc::default(),
        }
    }
}

impl HttpConfig {
    /// The body limit in force now.
    pub fn body_limit(&self) -> usize {
        self.max_body_bytes.load(Ordering::Relaxed)
    }
}

struct AppState {
    engine: Engine,
    guard: crate::layers::Guard,
    /// `x-haven-node` of every answer: the node that gave it (useful behind a load balancer).
    node: Option<HeaderValue>,
}

impl AppState {
    fn tag(&self, r: &mut Response) {
        if let Some(n) = &self.node {
            r.headers_mut()
                .insert(HeaderName::from_static("x-haven-node"), n.clone());
        }
    }
}

/// `/mcp`, handed its requests by the connection without the router (see [`App`]): no path
/// lookup, no service cloned and no future boxed by routing layers on the hot path.
#[derive(Clone)]
pub struct Mcp(Arc<AppState>);

impl Mcp {
    /// Answers one request to `/mcp` as the router's `/mcp` route does.
    pub(crate) async fn serve(
        self,
        req: http::Request<hyper::body::Incoming>,
    ) -> Result<Response, std::convert::Infallible> {
        let req = req.map(Body::new);
        let mut r = match *req.method() {
            http::Method::GET | http::Method::HEAD | http::Method::POST | http::Method::DELETE => {
                mcp(State(self.0.clone()), req).await
            }
            // As the route's fallback: no check applies to another method.
            _ => method_not_allowed().await,
        };
        self.0.tag(&mut r);
        Ok(r)
    }
}

/// What a listener serves: `/mcp` straight to its handler when the app has one, every other
/// path (and `/mcp` when it has none) through the router.
#[derive(Clone)]
pub struct App {
    pub(crate) router: Router,
    pub(crate) mcp: Option<Mcp>,
}

impl App {
    /// The app with `other`'s routes added (see [`Router::merge`]).
    pub fn merge(mut self, other: Router) -> App {
        self.router = self.router.merge(other);
        self
    }

    /// The router alone (it serves `/mcp` too, through routing).
    pub fn into_router(self) -> Router {
        self.router
    }
}

impl From<Router> for App {
    fn from(router: Router) -> App {
        App { router, mcp: None }
    }
}

/// The router: `/mcp`, `/healthz`, `/readyz`.
pub fn router(engine: Engine, config: HttpConfig) -> Router {
    app(engine, config).into_router()
}

/// The router of [`router`], and `/mcp` answered without it.
pub fn app(engine: Engine, config: HttpConfig) -> App {
    let node = HeaderValue::from_str(&engine.config().node_id).ok();
    let state = Arc::new(AppState {
        engine,
        guard: crate::layers::Guard {
            admission: config.admission.clone(),
            rate: config.rate.clone(),
            hosts: host_origin::AllowedHosts::new(&config.allowed_hosts),
            authentication: config.authentication.clone(),
            body: body_limit::BodyLimit {
                bytes: config.max_body_bytes.clone(),
                limits: config.limits.clone(),
            },
        },
        node,
    });
    // A plain function of the response: no future boxed per request.
    let tagger = state.clone();
    let tag = tower::util::MapResponseLayer::new(move |mut r: Response| {
        tagger.tag(&mut r);
        r
    });
    // The checks of `/mcp` (`layers`) apply to its methods, not to the fallback: any other
    // method gets 405 whatever its headers.
    let endpoint = get(mcp).post(mcp).delete(mcp).fallback(method_not_allowed);
    let mut router = Router::new()
        .route("/mcp", endpoint)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if let Some(auth) = &config.authentication {
        // RFC 9728 protected resource metadata, at the path-suffixed well-known URI and at the
        // bare one (clients try both), readable without credentials.
        let document = auth
            .authenticator
            .resource_metadata(&auth.resource)
            .to_string();
        let serve_document = move || {
            let document = document.clone();
            async move {
                let mut r = json_response(StatusCode::OK, document);
                r.headers_mut().insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
                r
            }
        };
        let path = auth.metadata_path();
        router = router.route(
            "/.well-known/oauth-protected-resource",
            get(serve_document.clone()),
        );
        if path != "/.well-known/oauth-protected-resource" {
            router = router.route(&path, get(serve_document));
        }
    }
    App {
        router: router.with_state(state.clone()).layer(tag),
        mcp: Some(Mcp(state)),
    }
}

/// How long a stopping server waits for open connections (SSE streams included) to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` (a router, or [`app`] with its direct `/mcp`) on `listener` with the default
/// connection limits until `shutdown` resolves, then lets open connections finish (bounded by
/// a grace period).
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Arc::new(crate::conn::ConnLimits::default());
    crate::conn::serve(listener, app, limits, shutdown, SHUTDOWN_GRACE).await
}

/// [`serve`] within `config`'s connection limits, with the grace period for open connections
/// after `shutdown`.
pub async fn serve_with_grace(
    listener: TcpListener,
    app: impl Into<App>,
    config: &HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    crate::conn::serve(listener, app, config.limits.clone(), shutdown, grace).await
}

/// [`serve_with_grace`] over TLS when `tls` is given (see [`crate::conn::serve_maybe_tls`]).
pub async fn serve_tls(
    listener: TcpListener,
    app: impl Into<App>,
    config: &HttpConfig,
    tls: Option<&crate::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    crate::conn::serve_maybe_tls(
        listener,
        app,
        config.limits.clone(),
        tls.map(|t| t.acceptor()),
        shutdown,
        grace,
    )
    .await
}

/// [`serve_tls`] whose drain also waits for `settled` (see
/// [`crate::conn::serve_until_settled`]).
pub async fn serve_tls_until_settled(
    listener: TcpListener,
    app: impl Into<App>,
    config: &HttpConfig,
    tls: Option<&crate::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    settled: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    crate::conn::serve_until_settled(
        listener,
        app,
        config.limits.clone(),
        tls.map(|t| t.acceptor()),
        shutdown,
        settled,
        grace,
    )
    .await
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, r#"{"status":"alive"}"#.to_owned())
}

async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.engine.is_draining() {
        let mut r = json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"draining","reason":"this node is shutting down"}"#.to_owned(),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let check =
        tokio::time::timeout(Duration::from_secs(2), app.engine.store().check_writable()).await;
    match check {
        Ok(Ok(())) => json_response(StatusCode::OK, r#"{"status":"ready"}"#.to_owned()),
        Ok(Err(e)) => {
            let body = serde_json::json!({ "status": "unavailable", "reason": e.to_string() });
            let mut r = json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Err(_) => {
            let body = r#"{"status":"unavailable","reason":"the store did not answer within 2 s"}"#;
            let mut r = json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_owned());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn method_not_allowed() -> Response {
    respond(Era::Legacy, Rejection::method_not_allowed().into())
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The W3C trace context headers of a request, for the engine (it validates them).
fn trace_headers(headers: &HeaderMap) -> TraceHeaders {
    TraceHeaders {
        traceparent: header_str(headers, &names::TRACEPARENT).map(str::to_owned),
        tracestate: header_str(headers, &names::TRACESTATE).map(str::to_owned),
    }
}

/// The routing headers of a stateless request, as plain data for the engine.
fn stateless_headers(headers: &HeaderMap, version: Option<String>) -> StatelessHeaders {
    let params = headers
        .iter()
        .filter_map(|(k, v)| {
            let name = k.as_str().strip_prefix("mcp-param-")?;
            Some((name.to_owned(), v.to_str().ok()?.to_owned()))
        })
        .collect();
    StatelessHeaders {
        protocol_version: version,
        method: header_str(headers, &names::METHOD).map(str::to_owned),
        name: header_str(headers, &names::NAME).map(str::to_owned),
        params,
    }
}

/// `/mcp`: the request checked (`layers`), then handled by its method; its place (admission)
/// is held until the answer's body ends.
async fn mcp(State(app): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    let admitted = match app.guard.admit(req).await {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let Admitted {
        parts,
        accepts,
        principal,
        body,
        place,
    } = admitted;
    let response = match parts.method {
        http::Method::POST => mcp_post(&app, accepts, principal, parts.headers, body).await,
        // axum routes HEAD to the GET handler too (and sends no body).
        http::Method::GET | http::Method::HEAD => mcp_get(&app, principal, parts.headers).await,
        http::Method::DELETE => mcp_delete(&app, principal, parts.headers).await,
        _ => method_not_allowed().await,
    };
    place.hold(response)
}

/// POST /mcp: one JSON-RPC message (its media types and size already checked), dispatched to
/// the era it belongs to.
async fn mcp_post(
    app: &AppState,
    accepts: crate::layers::content::Accepts,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let message = match jsonrpc::parse(&body) {
        Ok(m) => m,
        // No era yet; a refusal's status does not depend on one.
        Err(m) => return respond_in(Era::Legacy, Rejection::from(m).into(), headers),
    };
    let version = header_str(&headers, &names::PROTOCOL_VERSION).map(str::to_owned);
    let stateless = is_stateless(version.as_deref(), &message);
    let era = if stateless {
        Era::Stateless
    } else {
        Era::Legacy
    };
    if let Some(refused) = rate::check_tool(&app.guard.rate, Some(&principal), &message, era) {
        return refused;
    }
    if stateless {
        let post = StatelessPost {
            headers: stateless_headers(&headers, version),
            message,
            from_http: true,
            principal,
            trace: trace_headers(&headers),
        };
        respond_in(
            Era::Stateless,
            app.engine.stateless_post(post).await,
            headers,
        )
    } else {
        let post = LegacyPost {
            session: header_str(&headers, &names::SESSION_ID).map(str::to_owned),
            protocol_version: version,
            accepts_json: accepts.json,
            accepts_sse: accepts.sse,
            message,
            principal,
            trace: trace_headers(&headers),
        };
        respond_in(Era::Legacy, app.engine.legacy_post(post).await, headers)
    }
}

/// GET /mcp: a legacy session's standalone stream, or the resumption of one of its streams.
async fn mcp_get(app: &AppState, principal: Principal, headers: HeaderMap) -> Response {
    let reply: Reply = app
        .engine
        .legacy_get(
            header_str(&headers, &names::SESSION_ID),
            header_str(&headers, &names::PROTOCOL_VERSION),
            header_str(&headers, &names::LAST_EVENT_ID),
            &principal,
        )
        .await;
    respond_in(Era::Legacy, reply, headers)
}

/// DELETE /mcp: ends a legacy session.
async fn mcp_delete(app: &AppState, principal: Principal, headers: HeaderMap) -> Response {
    let reply = app
        .engine
        .legacy_delete(
            header_str(&headers, &names::SESSION_ID),
            header_str(&headers, &names::PROTOCOL_VERSION),
            &principal,
        )
        .await;
    respond_in(Era::Legacy, reply, headers)
}
