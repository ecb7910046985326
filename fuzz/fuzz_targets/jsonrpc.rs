//! `haven_mcp::jsonrpc`: parsing and classifying one incoming message, reading its `_meta`,
//! typed parameters, and choosing the era. Every input gets a classification or a JSON-RPC
//! error of the right family, the fast path agrees with the generic one, and whatever is
//! answered serializes to valid JSON-RPC.
#![no_main]

use haven_fuzz::assert_clear_message;
use haven_mcp::engine::is_stateless;
use haven_mcp::jsonrpc::{self, Incoming};
use haven_mcp::rmcp::model::{
    CallToolRequestParams, CompleteRequestParams, GetPromptRequestParams, InitializeRequestParams,
    ReadResourceRequestParams,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// What a classification is, for comparing two of them.
fn kind(r: &Result<Incoming, jsonrpc::Malformed>) -> String {
    match r {
        Ok(Incoming::Request(q)) => format!("request {:?} {}", q.id, q.method),
        Ok(Incoming::Notification { method, .. }) => format!("notification {method}"),
        Ok(Incoming::Response { id, .. }) => format!("response {id:?}"),
        Ok(Incoming::Error { id, .. }) => format!("error {id:?}"),
        Err(m) => format!("malformed {:?} {}", m.id, m.error.code.0),
    }
}

fn check_json_rpc(text: &str) {
    let v: Value = serde_json::from_str(text).expect("an answer is valid JSON");
    assert_eq!(v["jsonrpc"], "2.0", "an answer is JSON-RPC 2.0: {text}");
}

fuzz_target!(|data: &[u8]| {
    let parsed = jsonrpc::parse(data);
    // The generic path (used when the fast one fails) must classify the same way.
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        let generic = jsonrpc::classify(value);
        assert_eq!(
            kind(&parsed),
            kind(&generic),
            "fast and generic paths disagree"
        );
        // The fast path reads `_meta` while parsing; the generic one keeps it as text. Both
        // must read the same fields, or both refuse it.
        if let (Ok(Incoming::Request(fast)), Ok(Incoming::Request(generic))) = (&parsed, &generic) {
            assert_eq!(
                format!("{:?}", fast.meta().ok()),
                format!("{:?}", generic.meta().ok()),
                "fast and generic paths read _meta differently"
            );
        }
    }
    match &parsed {
        Err(m) => {
            assert!(
                [-32700, -32600, -32602].contains(&m.error.code.0),
                "unexpected error code {}",
                m.error.code.0
            );
            assert_clear_message("malformed message", &m.error.message);
            check_json_rpc(&jsonrpc::error_response(m.id.as_ref(), &m.error));
        }
        Ok(Incoming::Request(r)) => {
            let _ = r.meta();
            let p = r.params.as_ref();
            let _ = jsonrpc::typed_params::<CallToolRequestParams>(&r.method, p);
            let _ = jsonrpc::typed_params::<ReadResourceRequestParams>(&r.method, p);
            let _ = jsonrpc::typed_params::<GetPromptRequestParams>(&r.method, p);
            let _ = jsonrpc::typed_params::<CompleteRequestParams>(&r.method, p);
            let _ = jsonrpc::typed_params::<InitializeRequestParams>(&r.method, p);
            check_json_rpc(&jsonrpc::response(&r.id, &serde_json::json!({})));
            check_json_rpc(&jsonrpc::error_response(
                Some(&r.id),
                &jsonrpc::method_not_found(&r.method),
            ));
            // The era is chosen from the header, else from `_meta`, without failing.
            let message = parsed.as_ref().expect("a request");
            let _ = is_stateless(None, message);
            let _ = is_stateless(Some(&r.method), message);
        }
        Ok(Incoming::Notification { method, params }) => {
            check_json_rpc(&jsonrpc::notification(
                method,
                params.clone().map(Value::Object),
            ));
        }
        Ok(Incoming::Response { .. } | Incoming::Error { .. }) => {}
    }
});
