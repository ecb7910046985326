//! Haven's client for Streamable HTTP upstreams, under rmcp's transport worker.
//!
//! rmcp's own client for `reqwest::Client` parses the upstream's URL on every request and
//! decodes every JSON answer by trying each of `ServerJsonRpcMessage`'s variants in turn (and
//! within a response each of `ServerResult`'s), building an error for every variant it rejects.
//! Profiled on a federated `tools/call`, that decode was the largest single cost of the call in
//! Haven. [`UpstreamHttp`] sends the calls Haven forwards on its hot path (`tools/call`,
//! `resources/read`, `prompts/get`) with the URL parsed once, and decodes a JSON answer as the
//! result its request asks for; an answer that is not one (an error, another result) is decoded
//! as any message, as before. Everything else (the handshake, notifications, answers to the
//! upstream's requests, list calls, the session's event stream, closing the session) goes
//! through rmcp's client unchanged.
//!
//! What an answer to a forwarded call means is rmcp's client's, case for case: 202 or 204 is
//! accepted; 404 on a session is an expired session; 401 and 403 with a challenge are
//! refusals; 429 and 5xx are HTTP failures unless they carry a JSON-RPC error; an SSE answer is
//! a stream of events, each bounded in size; a JSON answer is bounded in size; anything else is
//! an unexpected answer. The errors are rmcp's over `reqwest::Error`, so the failure
//! classification (`failure.rs`) and the retry rule (`connect::not_delivered`) read them as
//! before.
//!
//! The POSTs of those calls go through hyper's client ([`Poster`]), with the upstream's URI
//! built once: reqwest's request path parses the URL twice on every request (its redirect
//! layer does, whatever the policy), and its redirect and retry layers wrap every request
//! (BENCHMARKS.md, "reqwest's layers taken off the forwarded call"). hyper's failures travel in
//! `StreamableHttpError::Io` as a [`PostFailure`], which the classification reads as it reads
//! reqwest's. An upstream whose URL carries credentials, or that a proxy applies to (the
//! `*_PROXY` variables, as reqwest reads them), keeps reqwest for everything.

use std::borrow::Cow;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyDataStream, Full};
use hyper::body::Body as _;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rmcp::model::{
    CallToolResult, ClientJsonRpcMessage, ClientRequest, GetMeta as _, GetPromptResult,
    JsonRpcMessage, JsonRpcResponse, MetaObject, ProgressToken, ReadResourceResult, Request,
    RequestId, RequestMetaObject, ServerJsonRpcMessage, ServerResult,
};
use rmcp::transport::common::http_header::{
    EVENT_STREAM_MIME_TYPE, HEADER_LAST_EVENT_ID, HEADER_SESSION_ID, JSON_MIME_TYPE,
};
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, HttpStatusError, InsufficientScopeError, SseError, StreamableHttpClient,
    StreamableHttpError, StreamableHttpPostResponse, StreamableHttpResponseLimits,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sse_stream::{Sse, SseStream};

type Error = StreamableHttpError<reqwest::Error>;

/// Longest `Retry-After` value kept (rmcp's bound).
const MAX_RETRY_AFTER: usize = 128;
/// What a forwarded call accepts as its answer (the Streamable HTTP transport's rule).
const ACCEPTED_TYPES: &str = "text/event-stream, application/json";
/// [`HEADER_SESSION_ID`] as a header name (a test checks they are the same).
const SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");

/// A Streamable HTTP client for one upstream: reqwest with the upstream's URL parsed once,
/// and hyper's client for the forwarded calls' POSTs.
#[derive(Clone)]
pub(crate) struct UpstreamHttp {
    client: reqwest::Client,
    target: Arc<Target>,
    /// `None`: reqwest posts the forwarded calls too (see [`Poster::new`]).
    poster: Option<Arc<Poster>>,
    /// What rmcp's worker sent its last request or notification of the session with.
    session: Arc<parking_lot::Mutex<Option<Arc<SessionContext>>>>,
}

/// What every message of an upstream's session is sent with: the URL, the session id (none
/// for an upstream that keeps no sessions), the authorization and the headers (the
/// configured ones and the protocol version). Taken from rmcp's worker, which opened the
/// session, so that forwarded calls can be sent in it without the worker (`direct.rs`).
pub(crate) struct SessionContext {
    uri: Arc<str>,
    session_id: Option<Arc<str>>,
    auth_header: Option<String>,
    headers: HashMap<HeaderName, HeaderValue>,
}

struct Target {
    /// The URL as rmcp's worker passes it on every request.
    text: String,
    /// `text` parsed; `None` if it does not parse (reqwest then reports it on each request,
    /// as before).
    url: Option<reqwest::Url>,
}

/// hyper's client for the POSTs of forwarded calls to one upstream, with its URI built once.
pub(crate) struct Poster {
    client: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: http::Uri,
}

impl Poster {
    /// A client for `url`, connecting within `connect_timeout` and verifying https:// upstreams
    /// with `tls` (no ALPN set: HTTP/1.1). `None` when reqwest must post instead: the URL
    /// carries credentials (reqwest sends them as `Authorization: Basic`), a proxy applies to
    /// it, or it is not an http:// or https:// URL that both clients read alike.
    pub(crate) fn new(
        url: &str,
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
    ) -> Option<Poster> {
        let parsed = reqwest::Url::parse(url).ok()?;
        if !matches!(parsed.scheme(), "http" | "https")
            || !parsed.username().is_empty()
            || parsed.password().is_some()
        {
            return None;
        }
        let uri: http::Uri = parsed.as_str().parse().ok()?;
        if hyper_util::client::proxy::matcher::Matcher::from_system()
            .intercept(&uri)
            .is_some()
        {
            return None;
        }
        Some(Poster::build(uri, tls, connect_timeout))
    }

    fn build(uri: http::Uri, tls: rustls::ClientConfig, connect_timeout: Duration) -> Poster {
        // The TCP settings are reqwest's defaults, which the other requests keep.
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_keepalive(Some(Duration::from_secs(15)));
        tcp.set_keepalive_interval(Some(Duration::from_secs(15)));
        tcp.set_keepalive_retries(Some(3));
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        tcp.set_tcp_user_timeout(Some(Duration::from_secs(30)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Poster { client, uri }
    }

    async fn post(&self, headers: HeaderMap, body: Vec<u8>) -> Result<Answer, Error> {
        let mut request = http::Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = headers;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| PostFailure::Send(e).into_error())?;
        let (parts, body) = response.into_parts();
        Ok(Answer {
            status: parts.status,
            length: body.size_hint().exact(),
            headers: parts.headers,
            body: BodyDataStream::new(body)
                .map_err(|e| PostFailure::Body(e).into_error())
                .boxed(),
        })
    }
}

/// A failure of hyper's client posting a forwarded call, carried in
/// `StreamableHttpError::Io` (the error type stays rmcp's over reqwest's, which rmcp's worker
/// uses for everything else).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PostFailure {
    #[error("error sending request: {0}")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("error reading the answer: {0}")]
    Body(#[source] hyper::Error),
}

impl PostFailure {
    fn into_error(self) -> Error {
        StreamableHttpError::Io(std::io::Error::other(self))
    }

    /// The failure `e` carries, if it is one of hyper's client.
    pub(crate) fn of(e: &Error) -> Option<&PostFailure> {
        match e {
            StreamableHttpError::Io(io) => io.get_ref()?.downcast_ref(),
            _ => None,
        }
    }

    /// No connection: the request never reached the upstream.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, PostFailure::Send(e) if e.is_connect())
    }

    /// A timeout in the chain: the connection not made in time, or the TCP user timeout
    /// (what reqwest's `is_timeout` finds).
    pub(crate) fn is_timeout(&self) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = source {
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                return true;
            }
            source = e.source();
        }
        false
    }
}

/// An answer's status, headers and body, from either client.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    /// The body's length, when the answer says it.
    length: Option<u64>,
    body: futures::stream::BoxStream<'static, Result<Bytes, Error>>,
}

impl Answer {
    fn of_reqwest(mut response: reqwest::Response) -> Answer {
        Answer {
            status: response.status(),
            length: response.content_length(),
            headers: std::mem::take(response.headers_mut()),
            body: response
                .bytes_stream()
                .map_err(StreamableHttpError::Client)
                .boxed(),
        }
    }
}

impl UpstreamHttp {
    pub(crate) fn new(client: reqwest::Client, url: &str, poster: Option<Poster>) -> UpstreamHttp {
        UpstreamHttp {
            client,
            target: Arc::new(Target {
                text: url.to_owned(),
                url: reqwest::Url::parse(url).ok(),
            }),
            poster: poster.map(Arc::new),
            session: Arc::new(parking_lot::Mutex::new(None)),
        }
    }

    /// The session's context once rmcp's worker has sent a message in it (`None` before).
    pub(crate) fn session(&self) -> Option<Arc<SessionContext>> {
        self.session.lock().clone()
    }

    /// Keeps what rmcp's worker sends `message` with, unless it is the `initialize` request
    /// (a session starts with its answer). A session re-opened by the worker replaces it.
    fn remember(
        &self,
        message: &ClientJsonRpcMessage,
        uri: &Arc<str>,
        session_id: &Option<Arc<str>>,
        auth_header: &Option<String>,
        headers: &HashMap<HeaderName, HeaderValue>,
    ) {
        if let JsonRpcMessage::Request(r) = message
            && matches!(r.request, ClientRequest::InitializeRequest(_))
        {
            return;
        }
        let mut kept = self.session.lock();
        let same = kept.as_ref().is_some_and(|k| {
            k.session_id == *session_id
                && k.uri == *uri
                && k.auth_header == *auth_header
                && k.headers == *headers
        });
        if !same {
            *kept = Some(Arc::new(SessionContext {
                uri: uri.clone(),
                session_id: session_id.clone(),
                auth_header: auth_header.clone(),
                headers: headers.clone(),
            }));
        }
    }

    /// Posts a message, encoded by [`encode_call`] or [`encode`], in the session `s`, as
    /// rmcp's worker would (see [`UpstreamHttp::send`]).
    pub(crate) async fn send_in(
        &self,
        s: &SessionContext,
        message: Encoded,
    ) -> Result<StreamableHttpPostResponse, Error> {
        self.send(
            s.uri.clone(),
            message,
            s.session_id.clone(),
            s.auth_header.clone(),
            &s.headers,
            StreamableHttpResponseLimits::default(),
        )
        .await
    }

    /// Resumes the session's stream after the event `last_event_id` (an answer's stream that
    /// ended before the answer).
    pub(crate) async fn resume_in(
        &self,
        s: &SessionContext,
        last_event_id: String,
    ) -> Result<futures::stream::BoxStream<'static, Result<Sse, SseError>>, Error> {
        self.client
            .get_stream_with_max_sse_event_size(
                s.uri.clone(),
                s.session_id.clone(),
                Some(last_event_id),
                s.auth_header.clone(),
                s.headers.clone(),
                StreamableHttpResponseLimits::default().max_sse_event_size,
            )
            .await
    }

    fn post(&self, uri: &str) -> reqwest::RequestBuilder {
        match &self.target.url {
            Some(url) if uri == self.target.text => self.client.post(url.clone()),
            _ => self.client.post(uri),
        }
    }
}

/// The result type a request's answer is decoded as, when it is one of the calls Haven
/// forwards on its hot path.
#[derive(Clone, Copy)]
enum Expect {
    CallTool,
    ReadResource,
    GetPrompt,
    /// Not a forwarded call: rmcp's client sends it.
    Other,
}

impl Expect {
    fn of(message: &ClientJsonRpcMessage) -> Expect {
        match message {
            JsonRpcMessage::Request(r) => Expect::of_request(&r.request),
            _ => Expect::Other,
        }
    }

    fn of_request(request: &ClientRequest) -> Expect {
        match request {
            ClientRequest::CallToolRequest(_) => Expect::CallTool,
            ClientRequest::ReadResourceRequest(_) => Expect::ReadResource,
            ClientRequest::GetPromptRequest(_) => Expect::GetPrompt,
            _ => Expect::Other,
        }
    }
}

fn typed<R: DeserializeOwned>(
    body: &[u8],
    wrap: fn(R) -> ServerResult,
) -> Option<ServerJsonRpcMessage> {
    let t: JsonRpcResponse<R> = serde_json::from_slice(body).ok()?;
    Some(JsonRpcMessage::Response(JsonRpcResponse {
        jsonrpc: t.jsonrpc,
        id: t.id,
        result: wrap(t.result),
    }))
}

/// A message encoded to be posted, with the result its answer is decoded as. Encoded before
/// the send's future starts, so that the message itself is not part of it.
pub(crate) struct Encoded {
    body: Vec<u8>,
    expect: Expect,
}

/// Encodes `message` for [`UpstreamHttp::send_in`].
pub(crate) fn encode(message: &ClientJsonRpcMessage) -> Result<Encoded, Error> {
    let body = serde_json::to_vec(message).map_err(not_encoded)?;
    Ok(Encoded {
        body,
        expect: Expect::of(message),
    })
}

/// Encodes a forwarded call (request `id`) with `token` as its progress token: the JSON that
/// rmcp gives for the request with the token set in its metadata, without rmcp's detour for
/// `tools/call`, `resources/read` and `prompts/get` (it serializes the parameters to a `Value`
/// to merge the metadata into them: 8 k of a federated call's instructions; BENCHMARKS.md).
/// As in rmcp, the request's metadata joins the parameters' own `_meta` and wins on a
/// conflict; the token wins over both. Other requests, or one whose extensions carry
/// metadata of the older kind, are encoded by rmcp.
pub(crate) fn encode_call(
    request: &ClientRequest,
    id: &RequestId,
    token: ProgressToken,
) -> Result<Encoded, Error> {
    let direct = match request {
        ClientRequest::CallToolRequest(r) => direct_call(r, |p| &mut p.meta, id, &token),
        ClientRequest::ReadResourceRequest(r) => direct_call(r, |p| &mut p.meta, id, &token),
        ClientRequest::GetPromptRequest(r) => direct_call(r, |p| &mut p.meta, id, &token),
        _ => None,
    };
    match direct {
        Some(Ok(body)) => Ok(Encoded {
            body,
            expect: Expect::of_request(request),
        }),
        Some(Err(e)) => Err(not_encoded(e)),
        None => {
            let mut request = request.clone();
            request.get_meta_mut().set_progress_token(token);
            encode(&ClientJsonRpcMessage::request(request, id.clone()))
        }
    }
}

/// See [`encode_call`]; `meta`: the parameters' own `_meta`.
fn direct_call<M: Serialize, P: Serialize + Clone>(
    request: &Request<M, P>,
    meta: fn(&mut P) -> &mut Option<RequestMetaObject>,
    id: &RequestId,
    token: &ProgressToken,
) -> Option<Result<Vec<u8>, serde_json::Error>> {
    #[derive(Serialize)]
    struct Message<'a, M, P> {
        jsonrpc: &'static str,
        id: &'a RequestId,
        method: &'a M,
        params: &'a P,
    }
    if request.extensions.get::<MetaObject>().is_some() {
        return None;
    }
    let mut params = request.params.clone();
    let own = meta(&mut params).get_or_insert_default();
    if let Some(extra) = request.extensions.get::<RequestMetaObject>() {
        own.0
            .0
            .extend(extra.0.0.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    own.set_progress_token(token.clone());
    Some(serde_json::to_vec(&Message {
        jsonrpc: "2.0",
        id,
        method: &request.method,
        params: &params,
    }))
}

fn not_encoded(e: serde_json::Error) -> Error {
    StreamableHttpError::UnexpectedServerResponse(Cow::Owned(format!(
        "cannot encode the request: {e}"
    )))
}

/// Decodes a JSON answer: as the result `expect` names if it is one, else as any message.
fn decode(body: &[u8], expect: Expect) -> Result<ServerJsonRpcMessage, serde_json::Error> {
    let fast = match expect {
        Expect::CallTool => typed::<CallToolResult>(body, ServerResult::CallToolResult),
        Expect::ReadResource => typed::<ReadResourceResult>(body, ServerResult::ReadResourceResult),
        Expect::GetPrompt => typed::<GetPromptResult>(body, ServerResult::GetPromptResult),
        Expect::Other => None,
    };
    match fast {
        Some(m) => Ok(m),
        None => serde_json::from_slice(body),
    }
}

fn media_type_is(value: Option<&HeaderValue>, expected: &str) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case(expected))
}

/// Reads the whole body, failing once it passes `max` bytes.
async fn read_bounded(response: Answer, max: usize) -> Result<Vec<u8>, Error> {
    if response.length.is_some_and(|n| n > max as u64) {
        return Err(StreamableHttpError::ResponseBodyTooLarge { max_size: max });
    }
    let mut stream = response.body;
    let mut body = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        if chunk.len() > max - body.len() {
            return Err(StreamableHttpError::ResponseBodyTooLarge { max_size: max });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads at most `max` bytes of the body, for a diagnostic.
async fn read_prefix(response: Answer, max: usize) -> Vec<u8> {
    let mut stream = response.body;
    let mut body = Vec::new();
    while body.len() < max {
        match stream.next().await {
            Some(Ok(chunk)) => {
                let n = chunk.len().min(max - body.len());
                body.extend_from_slice(&chunk[..n]);
            }
            _ => break,
        }
    }
    body
}

fn challenge(response: &Answer) -> Result<Option<String>, Error> {
    match response.headers.get(WWW_AUTHENTICATE) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
            StreamableHttpError::UnexpectedServerResponse(Cow::Borrowed(
                "invalid www-authenticate header value",
            ))
        }),
    }
}

/// The `scope` parameter of a `WWW-Authenticate` challenge, quoted or not.
fn scope_of(header: &str) -> Option<String> {
    let at = header.to_ascii_lowercase().find("scope=")? + "scope=".len();
    let rest = &header[at..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => &quoted[..quoted.find('"')?],
        None => rest.split([',', ' ']).next().unwrap_or(""),
    };
    (!value.is_empty()).then(|| value.to_owned())
}

impl UpstreamHttp {
    /// Posts a message and reads its answer: JSON decoded as the result a forwarded call
    /// (`tools/call`, `resources/read`, `prompts/get`) asks for, or as any message; or the
    /// SSE stream.
    async fn send(
        &self,
        uri: Arc<str>,
        message: Encoded,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: &HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, Error> {
        let Encoded { body, expect } = message;
        let with_session = session_id.is_some();
        let headers = post_headers(auth_header, custom_headers, session_id)?;
        let response = match &self.poster {
            Some(poster) if *uri == *self.target.text => poster.post(headers, body).await?,
            _ => {
                let mut request = self.post(&uri);
                for (name, value) in &headers {
                    request = request.header(name, value);
                }
                Answer::of_reqwest(request.body(body).send().await?)
            }
        };
        let status = response.status;

        if status == StatusCode::UNAUTHORIZED
            && let Some(header) = challenge(&response)?
        {
            return Err(StreamableHttpError::AuthRequired(AuthRequiredError::new(
                header,
            )));
        }
        if status == StatusCode::FORBIDDEN
            && let Some(header) = challenge(&response)?
        {
            let scope = scope_of(&header);
            return Err(StreamableHttpError::InsufficientScope(
                InsufficientScopeError::new(header, scope),
            ));
        }
        if status == StatusCode::ACCEPTED || status == StatusCode::NO_CONTENT {
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        if status == StatusCode::NOT_FOUND && with_session {
            return Err(StreamableHttpError::SessionExpired);
        }
        let content_type = response.headers.get(CONTENT_TYPE).cloned();
        let is_json = media_type_is(content_type.as_ref(), JSON_MIME_TYPE);
        let new_session = response
            .headers
            .get(HEADER_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if !status.is_success() {
            return failed(response, status, is_json, new_session, &limits).await;
        }
        if media_type_is(content_type.as_ref(), EVENT_STREAM_MIME_TYPE) {
            let events = bounded_events(response, limits.max_sse_event_size);
            return Ok(StreamableHttpPostResponse::Sse(events, new_session));
        }
        if is_json {
            let body = read_bounded(response, limits.max_json_response_size).await?;
            return match decode(&body, expect) {
                Ok(m) => Ok(StreamableHttpPostResponse::Json(m, new_session)),
                Err(e) => Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(
                    format!("the answer is not a JSON-RPC message: {e}"),
                ))),
            };
        }
        Err(StreamableHttpError::UnexpectedContentType(
            content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        ))
    }
}

impl StreamableHttpClient for UpstreamHttp {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, Error> {
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            StreamableHttpResponseLimits::default(),
        )
        .await
    }

    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, Error> {
        self.remember(&message, &uri, &session_id, &auth_header, &custom_headers);
        if let Expect::Other = Expect::of(&message) {
            return self
                .client
                .post_message_with_response_limits(
                    uri,
                    message,
                    session_id,
                    auth_header,
                    custom_headers,
                    limits,
                )
                .await;
        }
        let message = encode(&message)?;
        self.send(
            uri,
            message,
            session_id,
            auth_header,
            &custom_headers,
            limits,
        )
        .await
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), Error> {
        self.client
            .delete_session(uri, session_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<futures::stream::BoxStream<'static, Result<Sse, SseError>>, Error> {
        self.client
            .get_stream(uri, session_id, last_event_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<futures::stream::BoxStream<'static, Result<Sse, SseError>>, Error> {
        self.client
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await
    }
}

/// The headers of a forwarded call's POST, in the order rmcp's worker sends them: what it
/// accepts, its type, the bearer token, the configured headers (none of those the worker sets
/// itself: rmcp's rule), the session.
fn post_headers(
    auth_header: Option<String>,
    custom_headers: &HashMap<HeaderName, HeaderValue>,
    session_id: Option<Arc<str>>,
) -> Result<HeaderMap, Error> {
    let invalid = |what: &str| {
        StreamableHttpError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} is not a valid header value"),
        ))
    };
    let mut headers = HeaderMap::with_capacity(4 + custom_headers.len());
    headers.append(ACCEPT, HeaderValue::from_static(ACCEPTED_TYPES));
    headers.append(CONTENT_TYPE, HeaderValue::from_static(JSON_MIME_TYPE));
    if let Some(token) = auth_header {
        let mut value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| invalid("the bearer token"))?;
        value.set_sensitive(true);
        headers.append(AUTHORIZATION, value);
    }
    for (name, value) in custom_headers {
        // The protocol version is the worker's own, passed this way.
        let n = name.as_str();
        if [ACCEPT.as_str(), HEADER_SESSION_ID, HEADER_LAST_EVENT_ID]
            .iter()
            .any(|reserved| n.eq_ignore_ascii_case(reserved))
        {
            return Err(StreamableHttpError::ReservedHeaderConflict(n.to_owned()));
        }
        headers.append(name.clone(), value.clone());
    }
    if let Some(id) = session_id {
        let value = HeaderValue::try_from(id.as_ref()).map_err(|_| invalid("the session id"))?;
        headers.append(SESSION_ID, value);
    }
    Ok(headers)
}

/// A non-success answer: its JSON-RPC error if it carries one (an answer, not a failure),
/// else an HTTP failure (429, 5xx) or the status with the start of the body.
async fn failed(
    response: Answer,
    status: StatusCode,
    is_json: bool,
    session: Option<String>,
    limits: &StreamableHttpResponseLimits,
) -> Result<StreamableHttpPostResponse, Error> {
    let http_failure =
        (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()).then(|| {
            let retry_after = response
                .headers
                .get(RETRY_AFTER)
                .filter(|v| v.as_bytes().len() <= MAX_RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            HttpStatusError::new(status.as_u16(), retry_after)
        });
    let auth = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if !is_json || auth || status == StatusCode::TOO_MANY_REQUESTS {
        if let Some(e) = http_failure {
            return Err(StreamableHttpError::HttpStatus(e));
        }
        let body = read_prefix(response, limits.max_error_response_size).await;
        return Err(unexpected(status, &body));
    }
    let body = match read_bounded(response, limits.max_json_response_size).await {
        Ok(body) => body,
        Err(e @ StreamableHttpError::ResponseBodyTooLarge { .. }) => {
            return Err(http_failure
                .map(StreamableHttpError::HttpStatus)
                .unwrap_or(e));
        }
        Err(e) => return Err(e),
    };
    if let Ok(m @ JsonRpcMessage::Error(_)) = serde_json::from_slice::<ServerJsonRpcMessage>(&body)
    {
        return Ok(StreamableHttpPostResponse::Json(m, session));
    }
    if let Some(e) = http_failure {
        return Err(StreamableHttpError::HttpStatus(e));
    }
    let end = body.len().min(limits.max_error_response_size);
    Err(unexpected(status, &body[..end]))
}

fn unexpected(status: StatusCode, body: &[u8]) -> Error {
    StreamableHttpError::UnexpectedServerResponse(Cow::Owned(format!(
        "HTTP {status}: {}",
        String::from_utf8_lossy(body)
    )))
}

/// An SSE answer's events, failing once one event passes `max` bytes (counted as they arrive,
/// before the event is parsed).
fn bounded_events(
    response: Answer,
    max: usize,
) -> futures::stream::BoxStream<'static, Result<Sse, SseError>> {
    let bytes = Bounded {
        inner: response.body,
        max,
        event: 0,
        line: 0,
        after_cr: false,
        failed: false,
    };
    SseStream::from_bytes_stream(bytes).boxed()
}

/// A byte stream that fails once an SSE event in it passes `max` bytes. An event ends at an
/// empty line; a line ends at `\n`, `\r` or `\r\n`.
struct Bounded {
    inner: futures::stream::BoxStream<'static, Result<Bytes, Error>>,
    max: usize,
    /// Bytes of the event so far.
    event: usize,
    /// Bytes of the line so far.
    line: usize,
    /// The last byte was `\r` (a `\n` right after it ends no further line).
    after_cr: bool,
    failed: bool,
}

impl Bounded {
    /// Counts `chunk`; false once an event passes the bound.
    fn admit(&mut self, chunk: &[u8]) -> bool {
        for &b in chunk {
            let crlf = self.after_cr && b == b'\n';
            self.after_cr = b == b'\r';
            if crlf {
                continue;
            }
            if b == b'\n' || b == b'\r' {
                if self.line == 0 {
                    self.event = 0;
                    continue;
                }
                self.line = 0;
            } else {
                self.line += 1;
            }
            self.event += 1;
            if self.event > self.max {
                return false;
            }
        }
        true
    }
}

impl Stream for Bounded {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if self.admit(&chunk) {
                    Poll::Ready(Some(Ok(chunk)))
                } else {
                    self.failed = true;
                    let max = self.max;
                    Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("an SSE event of the answer is over {max} bytes"),
                    ))))
                }
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::RequestId;

    fn counts(max: usize, chunks: &[&[u8]]) -> bool {
        let mut b = Bounded {
            inner: futures::stream::empty().boxed(),
            max,
            event: 0,
            line: 0,
            after_cr: false,
            failed: false,
        };
        chunks.iter().all(|c| b.admit(c))
    }

    #[test]
    fn an_event_over_the_bound_fails_and_one_at_it_passes() {
        // "data: ab" and its line end: 9 bytes.
        assert!(counts(9, &[b"data: ab\n\n"]));
        assert!(!counts(8, &[b"data: ab\n\n"]));
        // Split across chunks, with CRLF line ends split too.
        assert!(!counts(16, &[b"data: aaaa", b"aaaaaaa", b"aaaa"]));
        assert!(counts(
            12,
            &[b"data: hello\r", b"\n\r\ndata: world\r\n\r\n"]
        ));
    }

    #[test]
    fn the_bound_is_per_event() {
        let many: Vec<&[u8]> = std::iter::repeat_n(&b"data: x\n\n"[..], 100).collect();
        assert!(counts(8, &many));
    }

    #[test]
    fn an_answer_decodes_as_the_result_its_request_asks_for() {
        let body =
            br#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}]}}"#;
        let m = decode(body, Expect::CallTool).unwrap();
        let JsonRpcMessage::Response(r) = m else {
            panic!("not a response: {m:?}");
        };
        assert_eq!(r.id, RequestId::Number(7));
        // The same as decoding it as any message.
        let any: ServerJsonRpcMessage = serde_json::from_slice(body).unwrap();
        let JsonRpcMessage::Response(any) = any else {
            panic!("not a response: {any:?}");
        };
        assert_eq!(r.id, any.id);
        let (ServerResult::CallToolResult(typed), ServerResult::CallToolResult(any)) =
            (r.result, any.result)
        else {
            panic!("not tool results");
        };
        assert_eq!(typed, any);
    }

    #[test]
    fn an_error_or_another_result_decodes_as_any_message() {
        let error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"no such tool"}}"#;
        assert!(matches!(
            decode(error, Expect::CallTool).unwrap(),
            JsonRpcMessage::Error(_)
        ));
        // An empty result to a tools/call is rmcp's empty result, as before.
        let empty = br#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
        let JsonRpcMessage::Response(r) = decode(empty, Expect::CallTool).unwrap() else {
            panic!("not a response");
        };
        assert!(matches!(r.result, ServerResult::EmptyResult(_)));
        assert!(decode(b"{", Expect::ReadResource).is_err());
    }

    #[test]
    fn a_forwarded_call_is_encoded_as_rmcp_encodes_it() {
        use rmcp::model::{
            CallToolRequest, CallToolRequestParams, GetPromptRequest, GetPromptRequestParams,
            NumberOrString, ReadResourceRequest, ReadResourceRequestParams,
        };
        use serde_json::{Value, json};

        let as_rmcp = |request: &ClientRequest, id: &RequestId, token: &ProgressToken| {
            let mut request = request.clone();
            request.get_meta_mut().set_progress_token(token.clone());
            let body = serde_json::to_vec(&ClientJsonRpcMessage::request(request, id.clone()));
            serde_json::from_slice::<Value>(&body.unwrap()).unwrap()
        };
        let object = |v: Value| v.as_object().unwrap().clone();
        let mut own_meta = RequestMetaObject::default();
        own_meta.0.0 = object(json!({"a": 1, "progressToken": "the client's", "b": [2]}));
        let mut call = CallToolRequestParams::new("echo").with_arguments(object(
            json!({"text": "hé \"quoted\"", "n": 1.5, "none": null}),
        ));
        call.meta = Some(own_meta);
        let mut prompt = GetPromptRequestParams::new("p");
        prompt.arguments = Some(object(json!({"x": "y"})));
        let mut traced = ClientRequest::CallToolRequest(CallToolRequest::new(call.clone()));
        // Metadata in the extensions (a traceparent) joins the parameters' and wins on a
        // conflict.
        (traced.get_meta_mut().0)
            .0
            .extend(object(json!({"traceparent": "00-01-02-01", "b": "ext"})));
        let requests = [
            ClientRequest::CallToolRequest(CallToolRequest::new(call)),
            ClientRequest::CallToolRequest(CallToolRequest::new(CallToolRequestParams::new(
                "bare",
            ))),
            traced,
            ClientRequest::ReadResourceRequest(ReadResourceRequest::new(
                ReadResourceRequestParams::new("file:///a"),
            )),
            ClientRequest::GetPromptRequest(GetPromptRequest::new(prompt)),
        ];
        for request in &requests {
            let (id, token) = crate::direct::new_id();
            let ours = encode_call(request, &id, token.clone()).unwrap();
            let ours: Value = serde_json::from_slice(&ours.body).unwrap();
            assert_eq!(ours, as_rmcp(request, &id, &token));
            assert_eq!(ours["params"]["_meta"]["progressToken"], json!(id));
        }
        // A numeric id, and a request rmcp encodes (not a forwarded call).
        let id = RequestId::Number(7);
        let token = ProgressToken(NumberOrString::Number(7));
        let ping = ClientRequest::PingRequest(Default::default());
        let ours = encode_call(&ping, &id, token.clone()).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&ours.body).unwrap(),
            as_rmcp(&ping, &id, &token)
        );
    }

    #[test]
    fn the_session_header_is_rmcps() {
        assert!(SESSION_ID.as_str().eq_ignore_ascii_case(HEADER_SESSION_ID));
    }

    #[test]
    fn a_post_carries_the_workers_headers_in_its_order() {
        let custom = HashMap::from([(
            HeaderName::from_static("mcp-protocol-version"),
            HeaderValue::from_static("2025-11-25"),
        )]);
        let headers = post_headers(Some("t0k".into()), &custom, Some("s-1".into())).unwrap();
        let seen: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            seen,
            [
                ("accept", ACCEPTED_TYPES),
                ("content-type", "application/json"),
                ("authorization", "Bearer t0k"),
                ("mcp-protocol-version", "2025-11-25"),
                ("mcp-session-id", "s-1"),
            ]
        );
        assert!(headers[AUTHORIZATION].is_sensitive());
        // A configured header the worker sets itself is refused, as rmcp refuses it.
        let reserved = HashMap::from([(
            HeaderName::from_static("mcp-session-id"),
            HeaderValue::from_static("x"),
        )]);
        assert!(matches!(
            post_headers(None, &reserved, None),
            Err(StreamableHttpError::ReservedHeaderConflict(_))
        ));
        assert!(post_headers(Some("a\nb".into()), &HashMap::new(), None).is_err());
    }

    fn tls() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(haven_state::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    }

    /// Posts a `tools/call` body to `url` through hyper's client.
    async fn post_to(url: &str) -> Result<StreamableHttpPostResponse, Error> {
        let poster = Poster::build(url.parse().unwrap(), tls(), Duration::from_secs(10));
        let http = UpstreamHttp {
            poster: Some(Arc::new(poster)),
            ..UpstreamHttp::new(reqwest::Client::new(), url, None)
        };
        let message = Encoded {
            body: br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#
                .to_vec(),
            expect: Expect::CallTool,
        };
        let limits = StreamableHttpResponseLimits::default();
        http.send(url.into(), message, None, None, &HashMap::new(), limits)
            .await
    }

    #[tokio::test]
    async fn hypers_failures_are_read_as_reqwests_are() {
        use crate::failure::{Failure, Reason};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        // Nothing listens on the port: the request never reached the upstream.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = post_to(&format!("http://{closed}/mcp")).await.unwrap_err();
        assert!(
            PostFailure::of(&e).is_some_and(PostFailure::is_connect),
            "{e}"
        );
        assert!(crate::connect::never_reached(&e));
        assert_eq!(Failure::from_error("x", &e).reason, Reason::Unreachable);

        // The answer's body ends before its length: the request reached the upstream and
        // the connection was lost.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            // The whole request (its headers, then its body's closing brace).
            while !request.ends_with(b"}}") {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"jsonrpc\"")
                .await
                .unwrap();
            String::from_utf8(request).unwrap()
        });
        let e = post_to(&format!("http://{addr}/mcp")).await.unwrap_err();
        assert!(
            matches!(PostFailure::of(&e), Some(PostFailure::Body(_))),
            "{e}"
        );
        assert!(!crate::connect::never_reached(&e));
        assert_eq!(Failure::from_error("x", &e).reason, Reason::ConnectionLost);
        let request = server.await.unwrap().to_ascii_lowercase();
        assert!(request.starts_with("post /mcp http/1.1\r\n"), "{request}");
        assert!(request.contains("\r\naccept: text/event-stream, application/json\r\n"));
        assert!(request.contains(&format!("\r\nhost: {addr}\r\n")));
    }

    #[test]
    fn a_url_with_credentials_or_another_scheme_is_posted_by_reqwest() {
        let t = Duration::from_secs(1);
        // Unless a proxy the environment names applies (then reqwest posts, as it proxies).
        let proxied = |url: &str| {
            hyper_util::client::proxy::matcher::Matcher::from_system()
                .intercept(&url.parse().unwrap())
                .is_some()
        };
        for url in ["http://127.0.0.1:9/mcp", "https://127.0.0.1:9/mcp"] {
            assert_eq!(Poster::new(url, tls(), t).is_some(), !proxied(url), "{url}");
        }
        assert!(Poster::new("http://user:pw@127.0.0.1:9/mcp", tls(), t).is_none());
        assert!(Poster::new("http://user@127.0.0.1:9/mcp", tls(), t).is_none());
        assert!(Poster::new("ftp://127.0.0.1:9/mcp", tls(), t).is_none());
        assert!(Poster::new("not a url", tls(), t).is_none());
    }

    #[test]
    fn a_challenge_names_its_scope() {
        assert_eq!(
            scope_of(r#"Bearer error="insufficient_scope", scope="files:read files:write""#),
            Some("files:read files:write".to_owned())
        );
        assert_eq!(
            scope_of("Bearer scope=read:data, error=x"),
            Some("read:data".to_owned())
        );
        assert_eq!(scope_of("Bearer realm=x"), None);
    }
}
