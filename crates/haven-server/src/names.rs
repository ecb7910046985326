//! Header names Haven reads or writes, parsed once: looking a header up by a `&str` parses
//! the name on every call.

use http::HeaderName;

pub static PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
pub static METHOD: HeaderName = HeaderName::from_static("mcp-method");
pub static NAME: HeaderName = HeaderName::from_static("mcp-name");
pub static SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
pub static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
