//! Haven's server layer: MCP over Streamable HTTP (both protocol eras on one `/mcp` endpoint)
//! and over stdio, health and readiness endpoints, and the HTTP-level checks (Host and Origin,
//! body size, content types). It is the only crate that speaks HTTP: the engine's protocol
//! outcomes become statuses and headers in one place, `response`.

pub mod http;
pub mod response;
pub mod stdio;

pub use http::{HttpConfig, router, serve, serve_with_grace};
