//! A minimal MCP client over one keep-alive HTTP/1.1 connection (hyper, `TCP_NODELAY`).
//!
//! It speaks just enough MCP to benchmark `tools/call` on the `echo` tool: the stateless
//! 2026-07-28 era (per-request `_meta` plus `MCP-Protocol-Version`, `Mcp-Method` and
//! `Mcp-Name` headers) and the 2025-11-25 legacy era (initialize, `Mcp-Session-Id`,
//! `notifications/initialized`, then calls). Responses may be JSON or SSE; every reply is
//! checked to be a successful result echoing the sent text.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::Era;
use crate::sse::SseParser;

const ACCEPT_BOTH: HeaderValue = HeaderValue::from_static("application/json, text/event-stream");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";

/// Where an MCP endpoint lives: socket address, `Host` authority and request path.
#[derive(Clone, Debug)]
pub struct Target {
    /// The URL as given (`http://HOST:PORT/PATH`).
    pub url: String,
    /// The resolved socket address to connect to.
    pub addr: SocketAddr,
    /// The `Host` header value (`HOST:PORT`).
    pub authority: HeaderValue,
    /// The origin-form request target (`/mcp`).
    pub path: String,
}

impl Target {
    /// Parses an `http://` URL and resolves its host.
    pub async fn resolve(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("only http:// URLs are supported: {url}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(&host_port)
            .await
            .with_context(|| format!("resolving {host_port}"))?
            .next()
            .ok_or_else(|| anyhow!("{host_port} resolved to no address"))?;
        Ok(Self {
            url: url.to_owned(),
            addr,
            authority: HeaderValue::from_str(authority)?,
            path: path.to_owned(),
        })
    }
}

/// How the server framed a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// `Content-Type: application/json`, one JSON-RPC message.
    Json,
    /// `Content-Type: text/event-stream`, the response among SSE events.
    Sse,
}

/// Why a call failed, which decides how the connection recovers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The TCP/HTTP connection failed or timed out: reconnect.
    Transport,
    /// HTTP 404 on a legacy request: the session is gone, initialize again.
    SessionLost,
    /// Any other wrong status, body or result: the connection stays usable.
    Protocol,
}

/// A failed call: its kind and a human-readable reason.
#[derive(Clone, Debug)]
pub struct CallError {
    /// How the connection should recover.
    pub kind: FailureKind,
    /// What went wrong.
    pub message: String,
}

impl CallError {
    fn transport(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Transport,
            message: message.into(),
        }
    }

    fn protocol(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Protocol,
            message: message.into(),
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for CallError {}

/// Client settings shared by every connection of a run.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Which protocol era to speak.
    pub era: Era,
    /// The text sent to `echo` and expected back.
    pub text: String,
    /// Accept a legacy server that answers initialize without an `Mcp-Session-Id`.
    pub allow_sessionless: bool,
    /// Call Haven's `notes_put` (a durable write, note named `bench`, the text as its body)
    /// instead of `echo`; any successful, non-error result counts.
    pub notes_put: bool,
    /// Name of the echo tool: `echo`, or a federated one such as `ref__echo`.
    pub echo_tool: String,
    /// Extra headers sent on every request (e.g. `Authorization: Bearer ...`).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl ClientOptions {
    fn tool(&self) -> &str {
        if self.notes_put {
            "notes_put"
        } else {
            &self.echo_tool
        }
    }
}

type Conn = Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One keep-alive HTTP/1.1 connection speaking MCP to a server.
///
/// The hyper connection is polled in the caller's task alongside each exchange rather than
/// in a task of its own, which saves cross-task wake-ups on every call: the load generator
/// shares the machine with the server it measures, so its own CPU per call matters.
pub struct McpConnection {
    target: Arc<Target>,
    options: Arc<ClientOptions>,
    sender: SendRequest<Full<Bytes>>,
    conn: Option<Conn>,
    session_id: Option<HeaderValue>,
    protocol_version: HeaderValue,
    body_prefix: &'static str,
    body_suffix: Arc<str>,
    next_id: u64,
    reconnects: u64,
}

#[derive(Deserialize)]
struct Reply<T> {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default = "Option::default")]
    result: Option<T>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct EchoResult {
    #[serde(default)]
    content: Vec<ContentItem>,
    #[serde(rename = "isError", default)]
    is_error: bool,
}

#[derive(Deserialize)]
struct ContentItem {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct InitializeResult {
    #[serde(rename = "protocolVersion")]
    protocol_version: String,
}

async fn open(target: &Target) -> anyhow::Result<(SendRequest<Full<Bytes>>, Conn)> {
    let stream = TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    stream.set_nodelay(true)?;
    Ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?)
}

fn call_suffix(options: &ClientOptions) -> String {
    let text = serde_json::to_string(&options.text).expect("a string serializes");
    // The tool's name and its arguments, as JSON.
    let (tool, args) = if options.notes_put {
        (
            r#""notes_put""#.to_owned(),
            format!(r#"{{"name":"bench","text":{text}}}"#),
        )
    } else {
        (
            serde_json::to_string(&options.echo_tool).expect("a string serializes"),
            format!(r#"{{"text":{text}}}"#),
        )
    };
    match options.era {
        Era::Modern => format!(
            concat!(
                r#","method":"tools/call","params":{{"name":{},"arguments":{},"#,
                r#""_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","#,
                r#""io.modelcontextprotocol/clientCapabilities":{{}},"#,
                r#""io.modelcontextprotocol/clientInfo":{{"name":"mcp-load","version":"1"}}}}}}}}"#
            ),
            tool, args
        ),
        Era::Legacy => {
            format!(r#","method":"tools/call","params":{{"name":{tool},"arguments":{args}}}}}"#)
        }
    }
}

impl McpConnection {
    /// Opens a connection and, for the legacy era, performs the initialize handshake.
    pub async fn connect(target: Arc<Target>, options: Arc<ClientOptions>) -> anyhow::Result<Self> {
        let (sender, conn) = open(&target).await?;
        let body_suffix: Arc<str> = call_suffix(&options).into();
        let mut conn = Self {
            protocol_version: HeaderValue::from_static(options.era.protocol_version()),
            target,
            options,
            sender,
            conn: Some(conn),
            session_id: None,
            body_prefix: r#"{"jsonrpc":"2.0","id":"#,
            body_suffix,
            next_id: 1,
            reconnects: 0,
        };
        if conn.options.era == Era::Legacy {
            conn.initialize().await?;
        }
        Ok(conn)
    }

    /// How many times this connection had to reconnect after a transport failure.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The legacy session id, if the server issued one.
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_ref().and_then(|v| v.to_str().ok())
    }

    fn request(&self, method: Method, body: Bytes) -> http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(self.target.path.as_str())
            .header(HOST, self.target.authority.clone())
            .header(ACCEPT, ACCEPT_BOTH);
        if !body.is_empty() {
            builder = builder.header(CONTENT_TYPE, JSON);
        }
        for (name, value) in &self.options.headers {
            builder = builder.header(name, value.clone());
        }
        builder
    }

    /// Sends `request` and reads its reply with `read`, polling the connection meanwhile.
    async fn exchange<T, F, Fut>(
        &mut self,
        request: Request<Full<Bytes>>,
        read: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(Response<Incoming>) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let Some(conn) = self.conn.as_mut() else {
            return Err(CallError::transport("connection closed"));
        };
        let sender = &mut self.sender;
        let work = async {
            sender
                .ready()
                .await
                .map_err(|e| CallError::transport(format!("connection not ready: {e}")))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| CallError::transport(format!("request failed: {e}")))?;
            read(response).await
        };
        let outcome = tokio::select! {
            biased;
            result = work => Ok(result),
            closed = conn => Err(match closed {
                Ok(()) => "server closed the connection".to_owned(),
                Err(e) => format!("connection failed: {e}"),
            }),
        };
        match outcome {
            Ok(result) => result,
            Err(message) => {
                self.conn = None;
                Err(CallError::transport(message))
            }
        }
    }

    /// Sends a request whose reply matters only by its status (a notification, a DELETE).
    async fn send_for_status(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<StatusCode, CallError> {
        self.exchange(request, |response| async move {
            let status = response.status();
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::transport(format!("reading body: {e}")))?;
            Ok(status)
        })
        .await
    }

    async fn initialize(&mut self) -> anyhow::Result<()> {
        self.session_id = None;
        let body = Bytes::from(format!(
            concat!(
                r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{}","#,
                r#""capabilities":{{}},"clientInfo":{{"name":"mcp-load","version":"1"}}}}}}"#
            ),
            Era::Legacy.protocol_version()
        ));
        let request = self
            .request(Method::POST, body.clone())
            .body(Full::new(body))?;
        let (session, result) = self
            .exchange(request, |response| async move {
                let session = response.headers().get(SESSION_HEADER).cloned();
                let (_, result): (_, InitializeResult) = read_reply(response, 0).await?;
                Ok((session, result))
            })
            .await?;
        match session {
            Some(id) => self.session_id = Some(id),
            None if self.options.allow_sessionless => {}
            None => bail!("initialize response carried no Mcp-Session-Id header"),
        }
        self.protocol_version = HeaderValue::from_str(&result.protocol_version)?;
        let body = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        let mut builder = self
            .request(Method::POST, body.clone())
            .header(VERSION_HEADER, self.protocol_version.clone());
        if let Some(id) = &self.session_id {
            builder = builder.header(SESSION_HEADER, id.clone());
        }
        let status = self.send_for_status(builder.body(Full::new(body))?).await?;
        if !status.is_success() {
            bail!("notifications/initialized answered HTTP {status}");
        }
        Ok(())
    }

    /// Sends one `tools/call` of `echo` and checks the reply echoes the text.
    pub async fn call_echo(&mut self) -> Result<ResponseKind, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut body = String::with_capacity(self.body_prefix.len() + 20 + self.body_suffix.len());
        body.push_str(self.body_prefix);
        body.push_str(itoa(id, &mut [0u8; 20]));
        body.push_str(&self.body_suffix);
        let body = Bytes::from(body);
        let mut builder = self
            .request(Method::POST, body.clone())
            .header(VERSION_HEADER, self.protocol_version.clone());
        match self.options.era {
            Era::Modern => {
                builder = builder
                    .header("mcp-method", HeaderValue::from_static("tools/call"))
                    .header(
                        "mcp-name",
                        HeaderValue::from_str(self.options.tool())
                            .unwrap_or_else(|_| HeaderValue::from_static("echo")),
                    );
            }
            Era::Legacy => {
                if let Some(session) = &self.session_id {
                    builder = builder.header(SESSION_HEADER, session.clone());
                }
            }
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| CallError::protocol(format!("building request: {e}")))?;
        let legacy = self.options.era == Era::Legacy;
        let (kind, result): (_, EchoResult) = self
            .exchange(request, |response| async move {
                if legacy && response.status() == StatusCode::NOT_FOUND {
                    let _ = response.into_body().collect().await;
                    return Err(CallError {
                        kind: FailureKind::SessionLost,
                        message: "HTTP 404: session not found".into(),
                    });
                }
                read_reply(response, id).await
            })
            .await?;
        if result.is_error {
            return Err(CallError::protocol("tool result has isError: true"));
        }
        match result.content.as_slice() {
            [item] if item.kind == "text" && self.options.notes_put => Ok(kind),
            [item] if item.kind == "text" && item.text.as_deref() == Some(&self.options.text) => {
                Ok(kind)
            }
            _ => Err(CallError::protocol(
                "result content is not exactly one text item equal to the input",
            )),
        }
    }

    /// Restores a usable connection after `failure`: reconnects and/or re-initializes.
    pub async fn recover(&mut self, failure: FailureKind) -> anyhow::Result<()> {
        match failure {
            FailureKind::Protocol => Ok(()),
            FailureKind::Transport => {
                self.conn = None;
                let (sender, conn) = open(&self.target).await?;
                self.sender = sender;
                self.conn = Some(conn);
                self.reconnects += 1;
                Ok(())
            }
            FailureKind::SessionLost => self.initialize().await,
        }
    }

    /// Ends the legacy session with DELETE (best effort) and closes the connection.
    pub async fn close(mut self) {
        if let Some(session) = self.session_id.clone() {
            let request = self
                .request(Method::DELETE, Bytes::new())
                .header(SESSION_HEADER, session)
                .header(VERSION_HEADER, self.protocol_version.clone())
                .body(Full::new(Bytes::new()));
            if let Ok(request) = request {
                let _ = self.send_for_status(request).await;
            }
        }
    }
}

/// Formats `n` in decimal into `buf` without allocating.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

fn matches_id(id: &Option<serde_json::Value>, expected: u64) -> bool {
    id.as_ref().and_then(|v| v.as_u64()) == Some(expected)
}

/// Interprets one JSON-RPC message: `Some` if it is the response to `expected_id`.
fn parse_reply<T: DeserializeOwned>(data: &[u8], expected_id: u64) -> Option<Result<T, CallError>> {
    let reply: Reply<T> = match serde_json::from_slice(data) {
        Ok(reply) => reply,
        Err(e) => return Some(Err(CallError::protocol(format!("unparsable message: {e}")))),
    };
    if reply.method.is_some() || !matches_id(&reply.id, expected_id) {
        return None;
    }
    Some(match (reply.result, reply.error) {
        (_, Some(error)) => Err(CallError::protocol(format!("JSON-RPC error: {error}"))),
        (Some(result), None) => Ok(result),
        (None, None) => Err(CallError::protocol("response has neither result nor error")),
    })
}

/// Reads a POST response (JSON or SSE) and extracts the result for request `id`.
async fn read_reply<T: DeserializeOwned>(
    response: Response<Incoming>,
    id: u64,
) -> Result<(ResponseKind, T), CallError> {
    let status = response.status();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut body = response.into_body();
    if status != StatusCode::OK {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let snippet = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        return Err(CallError::protocol(format!("HTTP {status}: {snippet}")));
    }
    if content_type.starts_with("application/json") {
        let bytes = body
            .collect()
            .await
            .map_err(|e| CallError::transport(format!("reading body: {e}")))?
            .to_bytes();
        return match parse_reply(&bytes, id) {
            Some(result) => result.map(|r| (ResponseKind::Json, r)),
            None => Err(CallError::protocol(
                "JSON body is not the response to this request",
            )),
        };
    }
    if !content_type.starts_with("text/event-stream") {
        return Err(CallError::protocol(format!(
            "unexpected Content-Type `{content_type}`"
        )));
    }
    let mut parser = SseParser::new();
    let mut found: Option<Result<T, CallError>> = None;
    let mut on_event = |data: &str| {
        if found.is_none() {
            found = parse_reply(data.as_bytes(), id);
        }
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CallError::transport(format!("reading SSE body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            parser.feed(&data, &mut on_event);
        }
    }
    parser.finish(&mut on_event);
    match found {
        Some(result) => result.map(|r| (ResponseKind::Sse, r)),
        None => Err(CallError::protocol("SSE stream ended without the response")),
    }
}

impl From<anyhow::Error> for CallError {
    fn from(e: anyhow::Error) -> Self {
        CallError::transport(format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itoa_formats_extremes() {
        assert_eq!(itoa(0, &mut [0; 20]), "0");
        assert_eq!(itoa(1234, &mut [0; 20]), "1234");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), u64::MAX.to_string());
    }

    #[test]
    fn bodies_are_valid_json_rpc() {
        for era in [Era::Modern, Era::Legacy] {
            let options = ClientOptions {
                era,
                text: "he\"llo".into(),
                allow_sessionless: false,
                notes_put: false,
                echo_tool: "echo".into(),
                headers: Vec::new(),
            };
            let body = format!(r#"{{"jsonrpc":"2.0","id":7{}"#, call_suffix(&options));
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(value["method"], "tools/call");
            assert_eq!(value["params"]["arguments"]["text"], "he\"llo");
            let meta = &value["params"]["_meta"];
            assert_eq!(
                meta.get("io.modelcontextprotocol/protocolVersion")
                    .is_some(),
                era == Era::Modern
            );
        }
    }

    #[test]
    fn replies_match_only_their_id() {
        let ok = br#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"x"}]}}"#;
        assert!(parse_reply::<EchoResult>(ok, 4).is_none());
        assert!(matches!(parse_reply::<EchoResult>(ok, 3), Some(Ok(_))));
        let note = br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#;
        assert!(parse_reply::<EchoResult>(note, 3).is_none());
        let err = br#"{"jsonrpc":"2.0","id":3,"error":{"code":-1,"message":"m"}}"#;
        assert!(matches!(parse_reply::<EchoResult>(err, 3), Some(Err(_))));
    }
}
