//! JSON-RPC 2.0 framing: classifying an incoming message and building outgoing ones. Wire
//! types come from `rmcp::model`; this module only decides what kind of message arrived and
//! maps malformed input to the right error.

use rmcp::model::{
    ClientCapabilities, ErrorCode, ErrorData, Implementation, JsonObject, LoggingLevel,
    NumberOrString, ProgressToken, RequestId,
};
use serde_json::Value;
use serde_json::value::RawValue;

/// An incoming JSON-RPC message, classified.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A request: needs exactly one response.
    Request(IncomingRequest),
    /// A notification: no response.
    Notification {
        /// Method name.
        method: String,
        /// Parameters (an object, or absent).
        params: Option<JsonObject>,
    },
    /// A response to a request the server sent.
    Response {
        /// Id of the server's request.
        id: RequestId,
        /// The result object.
        result: Value,
    },
    /// An error response to a request the server sent.
    Error {
        /// Id of the server's request, when known.
        id: Option<RequestId>,
        /// The error.
        error: ErrorData,
    },
}

/// A request from the client.
#[derive(Debug, Clone)]
pub struct IncomingRequest {
    /// Request id.
    pub id: RequestId,
    /// Method name.
    pub method: String,
    /// Parameters (an object, or absent), without `_meta`.
    pub params: Option<JsonObject>,
    /// `params._meta`: read into its protocol fields while the message was parsed when it is
    /// well formed, else kept as text to be read leniently (see [`IncomingRequest::meta`]).
    pub meta: Option<Meta>,
}

/// A request's `params._meta`, as the message's parse left it.
#[derive(Debug, Clone)]
pub enum Meta {
    /// Read strictly in the same pass as the message (the common case).
    Read(Box<RequestMeta>),
    /// Kept as text: a strict read failed (a malformed optional field, or `_meta` not an
    /// object), or the message came through the generic parse.
    Raw(Box<RawValue>),
}

/// The protocol fields of a request's `_meta`.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// `io.modelcontextprotocol/protocolVersion` (stateless era).
    pub protocol_version: Option<String>,
    /// `io.modelcontextprotocol/clientCapabilities` (stateless era).
    pub client_capabilities: Option<ClientCapabilities>,
    /// `io.modelcontextprotocol/clientInfo` (stateless era, optional; ignored when malformed).
    pub client_info: Option<Implementation>,
    /// `io.modelcontextprotocol/logLevel` (stateless era, optional; ignored when malformed).
    pub log_level: Option<LoggingLevel>,
    /// `progressToken` (ignored when malformed).
    pub progress_token: Option<ProgressToken>,
    /// `traceparent` (W3C trace context, SEP-414; ignored when not a string).
    pub traceparent: Option<String>,
}

/// `_meta` read strictly: the fast path for well-formed requests.
#[derive(serde::Deserialize)]
struct StrictMeta {
    #[serde(rename = "io.modelcontextprotocol/protocolVersion", default)]
    protocol_version: Option<String>,
    #[serde(rename = "io.modelcontextprotocol/clientCapabilities", default)]
    client_capabilities: Option<ClientCapabilities>,
    #[serde(rename = "io.modelcontextprotocol/clientInfo", default)]
    client_info: Option<Implementation>,
    #[serde(rename = "io.modelcontextprotocol/logLevel", default)]
    log_level: Option<LoggingLevel>,
    #[serde(rename = "progressToken", default)]
    progress_token: Option<ProgressToken>,
    #[serde(default)]
    traceparent: Option<String>,
}

/// `_meta` read leniently, when the strict read failed: optional fields that are malformed are
/// dropped instead of failing the request.
#[derive(serde::Deserialize)]
struct LenientMeta {
    #[serde(rename = "io.modelcontextprotocol/protocolVersion", default)]
    protocol_version: Option<String>,
    #[serde(rename = "io.modelcontextprotocol/clientCapabilities", default)]
    client_capabilities: Option<ClientCapabilities>,
    #[serde(rename = "io.modelcontextprotocol/clientInfo", default)]
    client_info: Option<Value>,
    #[serde(rename = "io.modelcontextprotocol/logLevel", default)]
    log_level: Option<Value>,
    #[serde(rename = "progressToken", default)]
    progress_token: Option<Value>,
    #[serde(default)]
    traceparent: Option<Value>,
}

impl From<StrictMeta> for RequestMeta {
    fn from(m: StrictMeta) -> RequestMeta {
        RequestMeta {
            protocol_version: m.protocol_version,
            client_capabilities: m.client_capabilities,
            client_info: m.client_info,
            log_level: m.log_level,
            progress_token: m.progress_token,
            traceparent: m.traceparent,
        }
    }
}

impl IncomingRequest {
    /// Reads `_meta` (an absent `_meta` reads as `None`). Fails only when the protocol version
    /// or the client capabilities are malformed.
    pub fn meta(&self) -> Result<Option<RequestMeta>, serde_json::Error> {
        match &self.meta {
            None => Ok(None),
            Some(Meta::Read(m)) => Ok(Some(RequestMeta::clone(m))),
            Some(Meta::Raw(raw)) => read_meta(raw).map(Some),
        }
    }

    /// Like [`IncomingRequest::meta`], but moves a `_meta` already read out of the request
    /// instead of copying it (it then reads as absent).
    pub fn take_meta(&mut self) -> Result<Option<RequestMeta>, serde_json::Error> {
        match self.meta.take() {
            None => Ok(None),
            Some(Meta::Read(m)) => Ok(Some(*m)),
            Some(Meta::Raw(raw)) => {
                let read = read_meta(&raw);
                self.meta = Some(Meta::Raw(raw));
                read.map(Some)
            }
        }
    }
}

/// Reads `_meta` from its text: strictly, and leniently when that fails.
fn read_meta(raw: &RawValue) -> Result<RequestMeta, serde_json::Error> {
    if let Ok(m) = serde_json::from_str::<StrictMeta>(raw.get()) {
        return Ok(m.into());
    }
    let m: LenientMeta = serde_json::from_str(raw.get())?;
    fn opt<T: serde::de::DeserializeOwned>(v: Option<Value>) -> Option<T> {
        v.and_then(|v| serde_json::from_value(v).ok())
    }
    Ok(RequestMeta {
        protocol_version: m.protocol_version,
        client_capabilities: m.client_capabilities,
        client_info: opt(m.client_info),
        log_level: opt(m.log_level),
        progress_token: opt(m.progress_token),
        traceparent: opt(m.traceparent),
    })
}

/// Request parameters as parsed off the wire: the members, and `_meta` apart. The fast
/// parse reads `_meta` strictly and fails when it cannot: the generic parse that follows then
/// keeps it as text, to be read leniently.
#[derive(Default)]
struct Params {
    members: JsonObject,
    meta: Option<Meta>,
    not_an_object: bool,
}

impl<'de> serde::Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Params, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Params;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON-RPC params")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Params, A::Error> {
                let mut p = Params::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "_meta" {
                        let m: StrictMeta = map.next_value()?;
                        p.meta = Some(Meta::Read(Box::new(m.into())));
                    } else {
                        let v: Value = map.next_value()?;
                        p.members.insert(key, v);
                    }
                }
                Ok(p)
            }
            fn visit_unit<E>(self) -> Result<Params, E> {
                Ok(Params::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Params, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Params {
                    not_an_object: true,
                    ..Params::default()
                })
            }
            fn visit_bool<E>(self, _: bool) -> Result<Params, E> {
                Ok(Params {
                    not_an_object: true,
                    ..Params::default()
                })
            }
            fn visit_i64<E>(self, _: i64) -> Result<Params, E> {
                Ok(Params {
                    not_an_object: true,
                    ..Params::default()
                })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Params, E> {
                Ok(Params {
                    not_an_object: true,
                    ..Params::default()
                })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Params, E> {
                Ok(Params {
                    not_an_object: true,
                    ..Params::default()
                })
            }
            fn visit_str<E>(self, _: &str) -> Result<Params, E> {
                Ok(Params {
                    not_an_object: true,
                    ..Params::default()
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Params {
    fn from_value(v: Value) -> Params {
        match v {
            Value::Null => Params::default(),
            Value::Object(mut members) => {
                let meta = members
                    .remove("_meta")
                    .and_then(|m| serde_json::value::to_raw_value(&m).ok())
                    .map(Meta::Raw);
                Params {
                    members,
                    meta,
                    not_an_object: false,
                }
            }
            _ => Params {
                not_an_object: true,
                ..Params::default()
            },
        }
    }
}

/// Why a message could not be classified: the JSON-RPC error to answer with, and the request
/// id if one could be read.
#[derive(Debug, Clone)]
pub struct Malformed {
    /// Id to answer to, when the message had a readable one.
    pub id: Option<RequestId>,
    /// The error (-32700 or -32600).
    pub error: ErrorData,
}

fn invalid(id: Option<RequestId>, msg: &str) -> Malformed {
    Malformed {
        id,
        error: ErrorData::new(ErrorCode::INVALID_REQUEST, msg.to_owned(), None),
    }
}

fn read_id(v: &Value) -> Result<Option<RequestId>, ()> {
    match v {
        Value::String(s) => Ok(Some(NumberOrString::String(s.as_str().into()))),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(Some(NumberOrString::Number(i))),
            None => Err(()),
        },
        _ => Err(()),
    }
}

/// The members of a JSON-RPC message object, each `Some` when present (even if `null`).
#[derive(serde::Deserialize, Default)]
struct Members {
    #[serde(default, deserialize_with = "present")]
    jsonrpc: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    method: Option<Value>,
    #[serde(default)]
    params: Option<Params>,
    #[serde(default, deserialize_with = "present")]
    result: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    <Value as serde::Deserialize>::deserialize(d).map(Some)
}

/// Parses and classifies one JSON-RPC message from `body`.
pub fn parse(body: &[u8]) -> Result<Incoming, Malformed> {
    // The common case, an object, is read straight into its members (no intermediate map);
    // anything else goes through a generic parse to find the right error. Only an object may
    // take the fast path: serde reads a struct from an array too, by position, which would
    // take `["2.0", 1, "tools/list"]` for a request.
    let object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    let fast = if object {
        serde_json::from_slice::<Members>(body).ok()
    } else {
        None
    };
    match fast {
        Some(m) => classify_members(m),
        None => {
            let value: Value = serde_json::from_slice(body).map_err(|e| Malformed {
                id: None,
                error: ErrorData::new(ErrorCode::PARSE_ERROR, format!("Parse error: {e}"), None),
            })?;
            classify(value)
        }
    }
}

/// Classifies an already-parsed JSON value as a JSON-RPC message.
pub fn classify(value: Value) -> Result<Incoming, Malformed> {
    let Value::Object(mut obj) = value else {
        return Err(if value.is_array() {
            invalid(
                None,
                "Invalid Request: JSON-RPC batches are not supported; send one message per request",
            )
        } else {
            invalid(
                None,
                "Invalid Request: a JSON-RPC message must be an object",
            )
        });
    };
    classify_members(Members {
        jsonrpc: obj.remove("jsonrpc"),
        id: obj.remove("id"),
        method: obj.remove("method"),
        params: obj.remove("params").map(Params::from_value),
        result: obj.remove("result"),
        error: obj.remove("error"),
    })
}

fn classify_members(m: Members) -> Result<Incoming, Malformed> {
    let id_present = m.id.is_some();
    let id = match &m.id {
        None => None,
        Some(v) => match read_id(v) {
            Ok(id) => id,
            Err(()) => {
                return Err(invalid(
                    None,
                    "Invalid Request: id must be a string or an integer",
                ));
            }
        },
    };
    if m.jsonrpc.as_ref().and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(id, "Invalid Request: jsonrpc must be \"2.0\""));
    }
    let (params, meta) = match m.params {
        None => (None, None),
        Some(p) if !p.not_an_object => (Some(p.members), p.meta),
        Some(_) => {
            return Err(Malformed {
                id,
                error: ErrorData::new(
                    ErrorCode::INVALID_PARAMS,
                    "Invalid params: params must be an object",
                    None,
                ),
            });
        }
    };
    match m.method {
        Some(Value::String(method)) => match id {
            Some(id) => Ok(Incoming::Request(IncomingRequest {
                id,
                method,
                params,
                meta,
            })),
            None if id_present => Err(invalid(None, "Invalid Request: id must not be null")),
            None => Ok(Incoming::Notification { method, params }),
        },
        Some(_) => Err(invalid(id, "Invalid Request: method must be a string")),
        None => {
            if let Some(result) = m.result {
                match id {
                    Some(id) => Ok(Incoming::Response { id, result }),
                    None => Err(invalid(None, "Invalid Request: a response needs an id")),
                }
            } else if let Some(error) = m.error {
                let error: ErrorData = serde_json::from_value(error)
                    .map_err(|_| invalid(id.clone(), "Invalid Request: malformed error object"))?;
                Ok(Incoming::Error { id, error })
            } else {
                Err(invalid(id, "Invalid Request: missing method"))
            }
        }
    }
}

#[derive(serde::Serialize)]
struct Envelope<'a, R: serde::Serialize, E: serde::Serialize, P: serde::Serialize> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RequestId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<P>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<R>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<E>,
}

fn envelope<R: serde::Serialize, E: serde::Serialize, P: serde::Serialize>(
    e: Envelope<'_, R, E, P>,
) -> String {
    serde_json::to_string(&e).expect("JSON-RPC messages serialize")
}

/// Serializes a success response.
pub fn response(id: &RequestId, result: &impl serde::Serialize) -> String {
    envelope::<_, (), ()>(Envelope {
        jsonrpc: "2.0",
        id: Some(id),
        method: None,
        params: None,
        result: Some(result),
        error: None,
    })
}

/// Serializes a success response around an already serialized result object.
pub fn response_raw(id: &RequestId, result_json: &str) -> String {
    let id = serde_json::to_string(id).expect("ids serialize");
    let mut s = String::with_capacity(result_json.len() + id.len() + 36);
    s.push_str("{\"jsonrpc\":\"2.0\",\"id\":");
    s.push_str(&id);
    s.push_str(",\"result\":");
    s.push_str(result_json);
    s.push('}');
    s
}

/// Serializes an error response (`id` omitted when unknown).
pub fn error_response(id: Option<&RequestId>, error: &ErrorData) -> String {
    envelope::<(), _, ()>(Envelope {
        jsonrpc: "2.0",
        id,
        method: None,
        params: None,
        result: None,
        error: Some(error),
    })
}

/// Serializes a notification.
pub fn notification(method: &str, params: Option<Value>) -> String {
    envelope::<(), (), _>(Envelope {
        jsonrpc: "2.0",
        id: None,
        method: Some(method),
        params,
        result: None,
        error: None,
    })
}

/// Serializes a server-to-client request.
pub fn request(id: &RequestId, method: &str, params: Option<Value>) -> String {
    envelope::<(), (), _>(Envelope {
        jsonrpc: "2.0",
        id: Some(id),
        method: Some(method),
        params,
        result: None,
        error: None,
    })
}

/// Shorthand for an invalid-params error.
pub fn invalid_params(msg: impl Into<String>) -> ErrorData {
    ErrorData::new(ErrorCode::INVALID_PARAMS, msg.into(), None)
}

/// Shorthand for a method-not-found error.
pub fn method_not_found(method: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode::METHOD_NOT_FOUND,
        format!("Method not found: {method}"),
        None,
    )
}

/// Shorthand for an internal error.
pub fn internal(msg: impl Into<String>) -> ErrorData {
    ErrorData::new(ErrorCode::INTERNAL_ERROR, msg.into(), None)
}

/// Parses `params` into the typed parameters of a method, mapping failure to -32602.
pub fn typed_params<T: serde::de::DeserializeOwned>(
    method: &str,
    params: Option<&JsonObject>,
) -> Result<T, ErrorData> {
    let value = Value::Object(params.cloned().unwrap_or_default());
    serde_json::from_value(value)
        .map_err(|e| invalid_params(format!("Invalid params for {method}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: &str) -> IncomingRequest {
        match parse(body.as_bytes()) {
            Ok(Incoming::Request(r)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn meta_is_read_in_the_same_pass_or_kept_as_text_when_malformed() {
        let head = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"#;
        // Well formed: read while parsing, and moved out by `take_meta`.
        let mut r = request(&format!(
            r#"{head}"cursor":"c","_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}},"io.modelcontextprotocol/clientInfo":{{"name":"n","version":"1"}},"progressToken":7,"x":[1]}}}}}}"#
        ));
        assert!(matches!(r.meta, Some(Meta::Read(_))), "{:?}", r.meta);
        assert_eq!(r.params.as_ref().map(|p| p.len()), Some(1));
        let copy = r.meta().unwrap().unwrap();
        let m = r.take_meta().unwrap().unwrap();
        assert_eq!(m.protocol_version.as_deref(), Some("2026-07-28"));
        assert_eq!(copy.protocol_version, m.protocol_version);
        assert_eq!(m.client_info.map(|i| i.name).as_deref(), Some("n"));
        assert_eq!(
            m.progress_token,
            Some(ProgressToken(NumberOrString::Number(7)))
        );
        assert!(r.meta.is_none() && r.take_meta().unwrap().is_none());

        // A malformed optional field: the message still parses, `_meta` is kept as text and
        // read leniently, every time it is asked for.
        let mut r = request(&format!(
            r#"{head}"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":5,"progressToken":{{}},"traceparent":1}}}}}}"#
        ));
        assert!(matches!(r.meta, Some(Meta::Raw(_))), "{:?}", r.meta);
        for _ in 0..2 {
            let m = r.take_meta().unwrap().unwrap();
            assert_eq!(m.protocol_version.as_deref(), Some("2026-07-28"));
            assert!(m.client_info.is_none() && m.progress_token.is_none());
            assert!(m.traceparent.is_none());
        }

        // A malformed protocol version, or `_meta` not an object: reading it fails.
        for meta in [
            r#"{"io.modelcontextprotocol/protocolVersion":5}"#,
            "7",
            "null",
        ] {
            let mut r = request(&format!(r#"{head}"_meta":{meta}}}}}"#));
            assert!(r.meta().is_err(), "{meta}");
            assert!(r.take_meta().is_err(), "{meta}");
        }
        // No `_meta`.
        assert!(request(&format!("{head}}}}}")).meta().unwrap().is_none());
    }

    #[test]
    fn serializes_envelopes() {
        let id = NumberOrString::Number(3);
        assert_eq!(
            response(&id, &serde_json::json!({})),
            r#"{"jsonrpc":"2.0","id":3,"result":{}}"#
        );
        assert_eq!(
            response_raw(&id, "{}"),
            r#"{"jsonrpc":"2.0","id":3,"result":{}}"#
        );
        assert_eq!(notification("x", None), r#"{"jsonrpc":"2.0","method":"x"}"#);
        let e = ErrorData::new(ErrorCode::INVALID_PARAMS, "bad", None);
        assert_eq!(
            error_response(None, &e),
            r#"{"jsonrpc":"2.0","error":{"code":-32602,"message":"bad"}}"#
        );
    }

    #[test]
    fn classifies_messages() {
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            Ok(Incoming::Request(IncomingRequest { method, .. })) if method == "ping"
        ));
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            Ok(Incoming::Notification { .. })
        ));
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#),
            Ok(Incoming::Response { .. })
        ));
    }

    #[test]
    fn malformed_messages_get_the_right_codes() {
        assert_eq!(
            parse(b"{not json").unwrap_err().error.code,
            ErrorCode::PARSE_ERROR
        );
        assert_eq!(
            parse(b"[]").unwrap_err().error.code,
            ErrorCode::INVALID_REQUEST
        );
        assert_eq!(
            parse(b"42").unwrap_err().error.code,
            ErrorCode::INVALID_REQUEST
        );
        let m = parse(br#"{"jsonrpc":"1.0","id":7,"method":"ping"}"#).unwrap_err();
        assert_eq!(m.error.code, ErrorCode::INVALID_REQUEST);
        assert_eq!(m.id, Some(NumberOrString::Number(7)));
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#)
                .unwrap_err()
                .error
                .code,
            ErrorCode::INVALID_REQUEST
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#)
                .unwrap_err()
                .error
                .code,
            ErrorCode::INVALID_PARAMS
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#)
                .unwrap_err()
                .error
                .code,
            ErrorCode::INVALID_REQUEST
        );
    }
}
