//! The configuration service: runtime settings kept in the store (namespace [`CONFIG_NS`]),
//! watched by every node and applied without a restart.

/// Namespace of configuration records.
pub const CONFIG_NS: &str = "config";

/// Settings of upstream connections (the federation layer reads the current value on every
/// call, so a change applies to the next call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Per-call timeout of an upstream without its own, in milliseconds.
    pub timeout_ms: u64,
    /// Consecutive failures that open an upstream's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before letting one trial call through, ms.
    pub breaker_cooldown_ms: u64,
    /// Longest wait between restarts of a dead stdio upstream (the backoff doubles up to it), ms.
    pub restart_max_backoff_ms: u64,
    /// Longest wait for connecting to (and initializing) an upstream, ms.
    pub connect_timeout_ms: u64,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            timeout_ms: 30_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            restart_max_backoff_ms: 30_000,
            connect_timeout_ms: 10_000,
        }
    }
}
