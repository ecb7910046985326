//! Limits on what a client controls, shared with whoever changes them at runtime (the binary
//! applies the `limits.*` settings): each is read when a request needs it, so a change
//! applies to the next request. Exceeding one is an invalid-params error that names the limit
//! and changes nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Limits on what a client controls.
#[derive(Debug)]
pub struct ClientLimits {
    /// Resource subscriptions one session holds (`resources/subscribe`), and resource URIs
    /// one `subscriptions/listen` names.
    pub max_subscriptions_per_session: AtomicUsize,
    /// Length of a resource URI in a subscription, in bytes.
    pub max_uri_bytes: AtomicUsize,
    /// How long a legacy request whose client is gone runs on while nobody resumes its
    /// stream, in milliseconds; then it is cancelled.
    pub abandoned_call_ms: AtomicU64,
    /// The longest run of a request's handler (a tool call, a task run from its request),
    /// in milliseconds; then it is cancelled.
    pub max_call_ms: AtomicU64,
    /// Bytes of one legacy session's record (client info and capabilities from
    /// `initialize`, log level, subscriptions): what every change of the session rewrites.
    pub max_session_bytes: AtomicUsize,
    /// Tasks of one legacy session that are not expired yet.
    pub max_tasks_per_session: AtomicUsize,
    /// Legacy sessions this node created that have neither ended nor expired.
    pub max_sessions_per_node: AtomicUsize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_subscriptions_per_session: AtomicUsize::new(256),
            max_uri_bytes: AtomicUsize::new(4096),
            abandoned_call_ms: AtomicU64::new(120_000),
            max_call_ms: AtomicU64::new(3_600_000),
            max_session_bytes: AtomicUsize::new(65_536),
            max_tasks_per_session: AtomicUsize::new(256),
            max_sessions_per_node: AtomicUsize::new(100_000),
        }
    }
}

impl ClientLimits {
    /// The subscription limit in force.
    pub fn max_subscriptions(&self) -> usize {
        self.max_subscriptions_per_session.load(Ordering::Relaxed)
    }

    /// How long an abandoned legacy request runs on.
    pub fn abandoned_after(&self) -> Duration {
        Duration::from_millis(self.abandoned_call_ms.load(Ordering::Relaxed).max(1))
    }

    /// The longest run of a handler.
    pub fn max_call(&self) -> Duration {
        Duration::from_millis(self.max_call_ms.load(Ordering::Relaxed).max(1))
    }

    /// The session record size limit in force.
    pub fn max_session_bytes(&self) -> usize {
        self.max_session_bytes.load(Ordering::Relaxed)
    }

    /// The session limit per node in force.
    pub fn max_sessions_per_node(&self) -> usize {
        self.max_sessions_per_node.load(Ordering::Relaxed)
    }

    /// The task limit per session in force.
    pub fn max_tasks_per_session(&self) -> usize {
        self.max_tasks_per_session.load(Ordering::Relaxed)
    }

    /// The URI length limit in force.
    pub fn max_uri_bytes(&self) -> usize {
        self.max_uri_bytes.load(Ordering::Relaxed)
    }

    /// Checks a subscription's URI: the error's message names the limit.
    pub fn check_uri(&self, uri: &str) -> Result<(), String> {
        let max = self.max_uri_bytes();
        if uri.len() > max {
            return Err(format!(
                "the resource URI is {} bytes long; at most {max} are allowed (setting limits.max_uri_bytes)",
                uri.len()
            ));
        }
        Ok(())
    }

    /// Checks how many subscriptions one session would hold.
    pub fn check_count(&self, count: usize) -> Result<(), String> {
        let max = self.max_subscriptions();
        if count > max {
            return Err(format!(
                "a session holds at most {max} resource subscriptions (setting limits.max_subscriptions_per_session); unsubscribe from one first"
            ));
        }
        Ok(())
    }
}
