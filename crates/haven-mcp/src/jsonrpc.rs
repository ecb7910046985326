//! JSON-RPC 2.0 framing: classifying an incoming message and building outgoing ones. Wire
//! types come from `rmcp::model`; this module only decides what kind of message arrived and
//! maps malformed input to the right error.

use rmcp::model::{ErrorCode, ErrorData, JsonObject, NumberOrString, RequestId};
use serde_json::Value;

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
    /// Parameters (an object, or absent).
    pub params: Option<JsonObject>,
}

impl IncomingRequest {
    /// The `_meta` object of the parameters, if any.
    pub fn meta(&self) -> Option<&JsonObject> {
        self.params.as_ref()?.get("_meta")?.as_object()
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

/// Parses and classifies one JSON-RPC message from `body`.
pub fn parse(body: &[u8]) -> Result<Incoming, Malformed> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Malformed {
        id: None,
        error: ErrorData::new(ErrorCode::PARSE_ERROR, format!("Parse error: {e}"), None),
    })?;
    classify(value)
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
    let id = match obj.get("id") {
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
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(id, "Invalid Request: jsonrpc must be \"2.0\""));
    }
    let params = match obj.remove("params") {
        None => None,
        Some(Value::Object(p)) => Some(p),
        Some(Value::Null) => None,
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
    match obj.remove("method") {
        Some(Value::String(method)) => match id {
            Some(id) => Ok(Incoming::Request(IncomingRequest { id, method, params })),
            None if obj.contains_key("id") => {
                Err(invalid(None, "Invalid Request: id must not be null"))
            }
            None => Ok(Incoming::Notification { method, params }),
        },
        Some(_) => Err(invalid(id, "Invalid Request: method must be a string")),
        None => {
            if let Some(result) = obj.remove("result") {
                match id {
                    Some(id) => Ok(Incoming::Response { id, result }),
                    None => Err(invalid(None, "Invalid Request: a response needs an id")),
                }
            } else if let Some(error) = obj.remove("error") {
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
