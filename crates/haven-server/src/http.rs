//! The Streamable HTTP transport.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use haven_mcp::engine::{
    Engine, LegacyPost, Rejection, StatelessHeaders, StatelessPost, is_stateless,
};
use haven_mcp::jsonrpc;
use haven_mcp::rmcp::model::{ErrorCode, ErrorData};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

use crate::response::{Era, respond};

/// HTTP settings.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes. Shared, so that a configuration change
    /// applies to the next request without a restart.
    pub max_body_bytes: Arc<AtomicUsize>,
    /// Host names (without port) allowed in `Host` and `Origin`; `*` allows any.
    pub allowed_hosts: Vec<String>,
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
    config: HttpConfig,
}

/// The router: `/mcp`, `/healthz`, `/readyz`.
pub fn router(engine: Engine, config: HttpConfig) -> Router {
    // Every answer names the node that gave it (useful behind a load balancer).
    let node = HeaderValue::from_str(&engine.config().node_id).ok();
    let state = Arc::new(AppState { engine, config });
    let tag = axum::middleware::map_response(move |mut r: Response| {
        let node = node.clone();
        async move {
            if let Some(n) = node {
                r.headers_mut().insert("x-haven-node", n);
            }
            r
        }
    });
    Router::new()
        .route(
            "/mcp",
            get(mcp_get)
                .post(mcp_post)
                .delete(mcp_delete)
                .fallback(method_not_allowed),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .layer(tag)
}

/// How long a stopping server waits for open connections (SSE streams included) to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` resolves, then lets open connections finish
/// (bounded by a grace period). HTTP/1.1 only, every connection with `TCP_NODELAY`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_grace(listener, router, shutdown, SHUTDOWN_GRACE).await
}

/// [`serve`] with the grace period for open connections after `shutdown`.
pub async fn serve_with_grace(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "setting TCP_NODELAY failed");
                }
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::info!("connections still open after the grace period are closed");
        }
    }
    Ok(())
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

fn rpc_error(status: StatusCode, code: i32, message: &str) -> Response {
    let e = rmcp_error(code, message);
    json_response(status, jsonrpc::error_response(None, &e))
}

fn rmcp_error(code: i32, message: &str) -> ErrorData {
    ErrorData::new(ErrorCode(code), message.to_owned(), None)
}

async fn method_not_allowed() -> Response {
    respond(Era::Legacy, Rejection::method_not_allowed().into())
}

/// Header names Haven reads, parsed once (looking a header up by a `&str` parses the name on
/// every call).
mod names {
    use http::HeaderName;

    pub static HOST: HeaderName = http::header::HOST;
    pub static ORIGIN: HeaderName = http::header::ORIGIN;
    pub static ACCEPT: HeaderName = http::header::ACCEPT;
    pub static CONTENT_TYPE: HeaderName = http::header::CONTENT_TYPE;
    pub static PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
    pub static METHOD: HeaderName = HeaderName::from_static("mcp-method");
    pub static NAME: HeaderName = HeaderName::from_static("mcp-name");
    pub static SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
    pub static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Strips the port from a `Host` header value (handles `[::1]:8080`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 2]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// DNS-rebinding protection: `Host` and (if present) `Origin` must name an allowed host.
fn host_origin_rejection(config: &HttpConfig, headers: &HeaderMap) -> Option<Response> {
    if config.allowed_hosts.iter().any(|h| h == "*") {
        return None;
    }
    let allowed = |h: &str| {
        config
            .allowed_hosts
            .iter()
            .any(|a| a.eq_ignore_ascii_case(h))
    };
    if let Some(host) = header_str(headers, &names::HOST)
        && !allowed(host_name(host))
    {
        return Some(rpc_error(
            StatusCode::FORBIDDEN,
            -32000,
            &format!("Forbidden: Host {host} is not allowed"),
        ));
    }
    if let Some(origin) = header_str(headers, &names::ORIGIN) {
        let host = origin
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
        if !host.is_some_and(|h| allowed(host_name(h))) {
            return Some(rpc_error(
                StatusCode::FORBIDDEN,
                -32000,
                &format!("Forbidden: Origin {origin} is not allowed"),
            ));
        }
    }
    None
}

/// What an `Accept` header allows: (JSON, SSE).
fn accepts(headers: &HeaderMap) -> (bool, bool) {
    let Some(accept) = header_str(headers, &names::ACCEPT) else {
        return (true, true);
    };
    let mut json = false;
    let mut sse = false;
    for part in accept.split(',') {
        let media = part.split(';').next().unwrap_or("").trim();
        let is = |m: &str| media.eq_ignore_ascii_case(m);
        if is("*/*") {
            return (true, true);
        } else if is("application/json") || is("application/*") {
            json = true;
        } else if is("text/event-stream") || is("text/*") {
            sse = true;
        }
    }
    (json, sse)
}

async fn read_body(
    config: &HttpConfig,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Response> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > config.body_limit()
    {
        return Err(too_large(config));
    }
    let limited = http_body_util::Limited::new(body, config.body_limit());
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large(config))
        }
        Err(_) => Err(rpc_error(
            StatusCode::BAD_REQUEST,
            -32700,
            "Parse error: the request body could not be read",
        )),
    }
}

fn too_large(config: &HttpConfig) -> Response {
    rpc_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        -32600,
        &format!(
            "Payload Too Large: the request body exceeds {} bytes",
            config.body_limit()
        ),
    )
}

async fn mcp_post(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    if let Some(r) = host_origin_rejection(&app.config, headers) {
        return r;
    }
    let content_type = header_str(headers, &names::CONTENT_TYPE).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return rpc_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            -32600,
            &format!(
                "Unsupported Media Type: Content-Type must be application/json, got {content_type:?}"
            ),
        );
    }
    let (json_ok, sse_ok) = accepts(headers);
    if !json_ok && !sse_ok {
        return rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            -32600,
            "Not Acceptable: Accept must allow application/json and text/event-stream",
        );
    }
    let body = match read_body(&app.config, headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let message = match jsonrpc::parse(&body) {
        Ok(m) => m,
        // No era yet; a refusal's status does not depend on one.
        Err(m) => return respond(Era::Legacy, Rejection::from(m).into()),
    };
    let version = header_str(headers, &names::PROTOCOL_VERSION).map(str::to_owned);
    if is_stateless(version.as_deref(), &message) {
        let params = headers
            .iter()
            .filter_map(|(k, v)| {
                let name = k.as_str().strip_prefix("mcp-param-")?;
                Some((name.to_owned(), v.to_str().ok()?.to_owned()))
            })
            .collect();
        let headers = StatelessHeaders {
            protocol_version: version,
            method: header_str(headers, &names::METHOD).map(str::to_owned),
            name: header_str(headers, &names::NAME).map(str::to_owned),
            params,
        };
        let reply = app
            .engine
            .stateless_post(StatelessPost {
                headers,
                message,
                from_http: true,
            })
            .await;
        respond(Era::Stateless, reply)
    } else {
        let post = LegacyPost {
            session: header_str(headers, &names::SESSION_ID).map(str::to_owned),
            protocol_version: version,
            accepts_json: json_ok,
            accepts_sse: sse_ok,
            message,
        };
        respond(Era::Legacy, app.engine.legacy_post(post).await)
    }
}

async fn mcp_get(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(r) = host_origin_rejection(&app.config, &headers) {
        return r;
    }
    let version = header_str(&headers, &names::PROTOCOL_VERSION);
    let (_, sse_ok) = accepts(&headers);
    if !sse_ok {
        return rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            -32600,
            "Not Acceptable: GET /mcp needs Accept: text/event-stream",
        );
    }
    let reply = app
        .engine
        .legacy_get(
            header_str(&headers, &names::SESSION_ID),
            version,
            header_str(&headers, &names::LAST_EVENT_ID),
        )
        .await;
    respond(Era::Legacy, reply)
}

async fn mcp_delete(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(r) = host_origin_rejection(&app.config, &headers) {
        return r;
    }
    let reply = app
        .engine
        .legacy_delete(
            header_str(&headers, &names::SESSION_ID),
            header_str(&headers, &names::PROTOCOL_VERSION),
        )
        .await;
    respond(Era::Legacy, reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name("localhost:8080"), "localhost");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("example.com"), "example.com");
    }
}
