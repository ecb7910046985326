//! Haven's server layer: MCP over Streamable HTTP (both protocol eras on one `/mcp` endpoint)
//! and over stdio, health and readiness endpoints, and the HTTP-level checks (Host and Origin,
//! body size, content types). Protocol decisions are the engine's; this crate maps them to
//! HTTP.

pub mod http;
pub mod stdio;

pub use http::{HttpConfig, router, serve, serve_with_grace};
