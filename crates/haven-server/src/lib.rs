//! Haven's server layer: MCP over Streamable HTTP (both protocol eras on one `/mcp` endpoint)
//! and over stdio, health and readiness endpoints. It is the only crate that speaks HTTP: the
//! HTTP-level checks (Host and Origin, content types, body size) are its `layers`, and the
//! engine's protocol outcomes become statuses and headers in one place, `response`.

pub mod conn;
pub mod http;
pub mod layers;
mod names;
pub mod rate;
pub mod response;
pub mod stdio;
pub mod tls;

pub use conn::ConnLimits;
pub use http::{
    App, HttpConfig, app, router, serve, serve_tls, serve_tls_until_settled, serve_with_grace,
};
pub use tls::{MinVersion, ServerTls, TlsFiles};
