//! The configuration service: runtime settings kept in the store (namespace [`CONFIG_NS`], one
//! last-writer-wins record per setting), watched by every node and applied without a restart.
//!
//! The set of settings is fixed ([`SETTINGS`]): each has a type, bounds and a default. A value
//! is checked before it is stored, so a bad value changes nothing; a stored value this version
//! cannot read (written by a newer Haven, say) is ignored with a warning and the default holds.
//! Every node folds the records into a [`Snapshot`] and publishes it on a `watch` channel; the
//! parts of Haven that use a setting read the current snapshot (or react to a new one).

use std::collections::BTreeMap;
use std::sync::Arc;

use haven_state::{Batch, Change, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, watch};

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
    /// Longest wait for starting (and initializing) a stdio upstream until it has connected
    /// once on this node (a first start may fetch packages, e.g. `npx -y` on a cold cache), ms;
    /// the larger of this and `connect_timeout_ms` applies.
    pub first_start_timeout_ms: u64,
}

/// Connection limits of the HTTP server (applied to connections opened after a change; the
/// body deadline to the next request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpSettings {
    /// Longest wait for a request's headers (also how long an idle keep-alive connection
    /// stays open), ms.
    pub header_read_timeout_ms: u64,
    /// Longest time to read a request's body, ms.
    pub body_read_timeout_ms: u64,
    /// Open connections per node.
    pub max_connections: u64,
    /// Open connections per client address (0: no cap).
    pub max_connections_per_ip: u64,
    /// Largest request head, bytes.
    pub max_header_bytes: u64,
    /// Most header fields in one request.
    pub max_headers: u64,
}

/// The rate of one tool (setting `limits.rate.tools`): `count` calls per `period_secs`, with
/// bursts of `burst` (none: `limits.rate.per_tool_burst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolRate {
    /// Calls per period (0: no limit for this tool).
    pub count: u64,
    /// The period: 1, 60 or 3600 seconds.
    pub period_secs: u64,
    /// Calls let through at once, when the item names one.
    pub burst: Option<u64>,
}

/// Rate limit settings (`limits.rate.*`): a rate of 0 turns that limit off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateSettings {
    /// Requests per second from one client address, before authentication.
    pub per_ip_rps: u64,
    /// Burst per client address.
    pub per_ip_burst: u64,
    /// Requests per second of one principal.
    pub per_principal_rps: u64,
    /// Burst per principal.
    pub per_principal_burst: u64,
    /// `tools/call` per second of one principal for one tool.
    pub per_tool_rps: u64,
    /// Burst per principal and tool.
    pub per_tool_burst: u64,
    /// Tools with their own rate.
    pub tools: BTreeMap<String, ToolRate>,
    /// Keys one rate table holds at most.
    pub max_keys: u64,
}

/// Parses `limits.rate.tools`: comma-separated `TOOL=RATE[:BURST]` items, RATE being `N`
/// (per second), `N/s`, `N/min` or `N/h`, BURST at least 1. A tool named twice is an error.
pub fn parse_tool_rates(text: &str) -> Result<BTreeMap<String, ToolRate>, String> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (tool, rate) = item.split_once('=').ok_or_else(|| {
            format!("'{item}' is not TOOL=RATE[:BURST] (e.g. notes_put=10/min:5)")
        })?;
        let tool = tool.trim();
        if tool.is_empty()
            || tool.len() > 128
            || tool
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | ':' | ','))
        {
            return Err(format!(
                "'{tool}' is not a tool name (1 to 128 characters, no spaces, '=', ':' or ',')"
            ));
        }
        let (rate, burst) = match rate.split_once(':') {
            Some((r, b)) => {
                let b: u64 = b
                    .trim()
                    .parse()
                    .map_err(|_| format!("burst '{}' of {tool} is not a whole number", b.trim()))?;
                if b == 0 || b > 10_000_000 {
                    return Err(format!("burst {b} of {tool} is outside 1 to 10000000"));
                }
                (r, Some(b))
            }
            None => (rate, None),
        };
        let (count, unit) = rate.split_once('/').unwrap_or((rate, "s"));
        let count: u64 = count
            .trim()
            .parse()
            .map_err(|_| format!("rate '{}' of {tool} is not a whole number", count.trim()))?;
        if count > 1_000_000 {
            return Err(format!("rate {count} of {tool} is above 1000000"));
        }
        let period_secs = match unit.trim() {
            "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            other => return Err(format!("'{other}' is not a period (s, min or h)")),
        };
        let rate = ToolRate {
            count,
            period_secs,
            burst,
        };
        if out.insert(tool.to_owned(), rate).is_some() {
            return Err(format!("{tool} is named twice"));
        }
    }
    Ok(out)
}

/// Admission control settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// Requests a node serves at once.
    pub max_requests: u64,
    /// Requests that wait for a place.
    pub max_queued: u64,
    /// How long one waits, ms.
    pub queue_wait_ms: u64,
    /// Requests of one session at once.
    pub max_requests_per_session: u64,
    /// Longest scheduling delay before new requests are shed, ms (0: never).
    pub max_queue_delay_ms: u64,
}

/// Storage reclamation settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageSettings {
    /// How often a reclamation pass runs, ms.
    pub reclaim_interval_ms: u64,
    /// How long tombstones are kept, ms.
    pub tombstone_retention_ms: u64,
    /// How long stream events stay resumable, ms.
    pub event_retention_ms: u64,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            timeout_ms: 30_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            restart_max_backoff_ms: 30_000,
            connect_timeout_ms: 10_000,
            first_start_timeout_ms: 120_000,
        }
    }
}

/// The type and bounds of a setting.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// An integer within bounds (inclusive).
    Integer {
        /// Smallest value.
        min: u64,
        /// Largest value.
        max: u64,
    },
    /// One of a fixed set of words.
    OneOf(&'static [&'static str]),
    /// A log filter: `LEVEL` or `target=LEVEL` items separated by commas.
    LogFilter,
    /// Rates of named tools: `TOOL=RATE[:BURST]` items separated by commas (see
    /// [`parse_tool_rates`]); empty for none.
    ToolRates,
}

/// One known setting.
#[derive(Clone, Copy, Debug)]
pub struct SettingDef {
    /// Its key, e.g. `upstream.timeout_ms`.
    pub key: &'static str,
    /// Type and bounds.
    pub kind: Kind,
    /// Default, as text.
    pub default: &'static str,
    /// What it does.
    pub help: &'static str,
}

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Every runtime setting.
pub const SETTINGS: &[SettingDef] = &[
    SettingDef {
        key: "audit.checkpoint_interval_ms",
        kind: Kind::Integer {
            min: 1000,
            max: 86_400_000,
        },
        default: "60000",
        help: "longest time between a record of the audit log and the signed checkpoint that covers it (a checkpoint is also signed every 1000 records)",
    },
    SettingDef {
        key: "audit.retention_days",
        kind: Kind::Integer {
            min: 1,
            max: 36_500,
        },
        default: "90",
        help: "days of audit records kept: whole older days are removed from the start of each chain, and the removal is recorded in the log",
    },
    SettingDef {
        key: "audit.tool_calls",
        kind: Kind::OneOf(&["off", "on"]),
        default: "off",
        help: "whether every tool call is recorded in the audit log (principal, tool name, outcome; never its arguments or result)",
    },
    SettingDef {
        key: "catalog",
        kind: Kind::OneOf(&["default", "conformance", "none"]),
        default: "default",
        help: "Haven's built-in catalog served next to the federated upstreams (none: only upstreams)",
    },
    SettingDef {
        key: "http.body_read_timeout_ms",
        kind: Kind::Integer {
            min: 100,
            max: 3_600_000,
        },
        default: "30000",
        help: "longest time to read a request's body; a slower body is answered 408",
    },
    SettingDef {
        key: "http.header_read_timeout_ms",
        kind: Kind::Integer {
            min: 100,
            max: 3_600_000,
        },
        default: "10000",
        help: "longest wait for a request's headers, from the connection's opening or the end of the previous answer on it: slow clients and idle keep-alive connections are closed after it (applies to new connections)",
    },
    SettingDef {
        key: "http.max_connections",
        kind: Kind::Integer {
            min: 1,
            max: 1_000_000,
        },
        default: "10000",
        help: "open connections a node keeps; one more is answered 503 with Retry-After and closed (keep it below the process's file descriptor limit)",
    },
    SettingDef {
        key: "http.max_connections_per_ip",
        kind: Kind::Integer {
            min: 0,
            max: 1_000_000,
        },
        default: "0",
        help: "open connections from one client address, beyond which it is answered 503 (0: no cap per address; behind a proxy every connection comes from the proxy's address)",
    },
    SettingDef {
        key: "http.max_header_bytes",
        kind: Kind::Integer {
            min: 8192,
            max: 16 * 1024 * 1024,
        },
        default: "65536",
        help: "largest request head (request line and headers) in bytes; a larger one is answered 431 and its connection closed (applies to new connections)",
    },
    SettingDef {
        key: "http.max_headers",
        kind: Kind::Integer {
            min: 8,
            max: 10_000,
        },
        default: "100",
        help: "most header fields in one request; more are answered 431 and the connection closed (applies to new connections)",
    },
    SettingDef {
        key: "limits.abandoned_call_ms",
        kind: Kind::Integer {
            min: 1000,
            max: 86_400_000,
        },
        default: "120000",
        help: "how long a legacy request whose client left runs on while nobody resumes its stream (Last-Event-ID, on any node); then it is cancelled",
    },
    SettingDef {
        key: "limits.max_body_bytes",
        kind: Kind::Integer {
            min: 1024,
            max: 256 * 1024 * 1024,
        },
        default: "4194304",
        help: "largest MCP request body accepted over HTTP, in bytes",
    },
    SettingDef {
        key: "limits.max_call_ms",
        kind: Kind::Integer {
            min: 100,
            max: 604_800_000,
        },
        default: "3600000",
        help: "the longest a request's handler runs (a tool call, or a task run from its request); then it is cancelled",
    },
    SettingDef {
        key: "limits.max_note_bytes",
        kind: Kind::Integer {
            min: 1,
            max: 64 * 1024 * 1024,
        },
        default: "1048576",
        help: "bytes of one note's text (default catalog); a longer one is refused with invalid params",
    },
    SettingDef {
        key: "limits.max_notes",
        kind: Kind::Integer {
            min: 0,
            max: 1_000_000_000,
        },
        default: "100000",
        help: "notes the store holds (default catalog); a new note beyond it is refused with invalid params (overwriting one is not)",
    },
    SettingDef {
        key: "limits.max_queue_delay_ms",
        kind: Kind::Integer {
            min: 0,
            max: 60_000,
        },
        default: "250",
        help: "the longest a node's work may wait for its CPU: while the delay stays above it for a second, a growing share of new MCP requests is answered 503 with Retry-After at once (0: never shed by delay)",
    },
    SettingDef {
        key: "limits.max_queued_requests",
        kind: Kind::Integer {
            min: 0,
            max: 1_000_000,
        },
        default: "1024",
        help: "requests that wait for a place while a node serves limits.max_requests; beyond them a request is answered 503 at once",
    },
    SettingDef {
        key: "limits.max_requests",
        kind: Kind::Integer {
            min: 1,
            max: 1_000_000,
        },
        default: "4096",
        help: "MCP requests a node serves at once, open response streams included; more wait in the queue (limits.queue_wait_ms) or are answered 503 with Retry-After",
    },
    SettingDef {
        key: "limits.max_requests_per_session",
        kind: Kind::Integer {
            min: 1,
            max: 1_000_000,
        },
        default: "64",
        help: "MCP requests of one session in flight at once, open response streams included; one more is answered 429 with Retry-After",
    },
    SettingDef {
        key: "limits.max_session_bytes",
        kind: Kind::Integer {
            min: 1024,
            max: 16 * 1024 * 1024,
        },
        default: "65536",
        help: "bytes of one legacy session's record (client info and capabilities from initialize, log level, subscriptions), which every change of the session rewrites; an initialize or change beyond it is refused with invalid params",
    },
    SettingDef {
        key: "limits.max_sessions_per_node",
        kind: Kind::Integer {
            min: 1,
            max: 100_000_000,
        },
        default: "100000",
        help: "legacy sessions a node created that have neither ended nor expired; one more initialize is answered 503 with Retry-After (another node may take it)",
    },
    SettingDef {
        key: "limits.max_subscriptions_per_session",
        kind: Kind::Integer {
            min: 0,
            max: 1_000_000,
        },
        default: "256",
        help: "resource subscriptions one session holds (resources/subscribe), and resource URIs one subscriptions/listen names; one more is refused with invalid params",
    },
    SettingDef {
        key: "limits.max_tasks_per_session",
        kind: Kind::Integer {
            min: 1,
            max: 1_000_000,
        },
        default: "256",
        help: "tasks of one legacy session that have not expired (finished and cancelled ones count until their time-to-live ends); one more is refused with invalid params",
    },
    SettingDef {
        key: "limits.max_uri_bytes",
        kind: Kind::Integer {
            min: 16,
            max: 1_048_576,
        },
        default: "4096",
        help: "longest resource URI a subscription accepts, in bytes",
    },
    SettingDef {
        key: "limits.queue_wait_ms",
        kind: Kind::Integer {
            min: 0,
            max: 60_000,
        },
        default: "1000",
        help: "how long a request waits in the queue for a place before it is answered 503",
    },
    SettingDef {
        key: "limits.rate.max_keys",
        kind: Kind::Integer {
            min: 1,
            max: 10_000_000,
        },
        default: "100000",
        help: "client addresses, principals and (principal, tool) pairs each rate table tracks at most; idle ones are dropped, and while a table is full of busy ones, newcomers share one bucket",
    },
    SettingDef {
        key: "limits.rate.per_ip_burst",
        kind: Kind::Integer {
            min: 1,
            max: 10_000_000,
        },
        default: "200",
        help: "requests one client address may send at once before limits.rate.per_ip_rps applies",
    },
    SettingDef {
        key: "limits.rate.per_ip_rps",
        kind: Kind::Integer {
            min: 0,
            max: 1_000_000,
        },
        default: "0",
        help: "MCP requests per second from one client address, counted before authentication (an SSE stream counts when it opens); more are answered 429 with Retry-After (0: off; behind a proxy every request comes from the proxy's address)",
    },
    SettingDef {
        key: "limits.rate.per_principal_burst",
        kind: Kind::Integer {
            min: 1,
            max: 10_000_000,
        },
        default: "100",
        help: "requests one principal may send at once before limits.rate.per_principal_rps applies",
    },
    SettingDef {
        key: "limits.rate.per_principal_rps",
        kind: Kind::Integer {
            min: 0,
            max: 1_000_000,
        },
        default: "0",
        help: "MCP requests per second of one principal (authenticated caller; all unauthenticated callers are the one anonymous principal); more are answered 429 with Retry-After (0: off)",
    },
    SettingDef {
        key: "limits.rate.per_tool_burst",
        kind: Kind::Integer {
            min: 1,
            max: 10_000_000,
        },
        default: "20",
        help: "calls of one tool one principal may make at once before its rate applies",
    },
    SettingDef {
        key: "limits.rate.per_tool_rps",
        kind: Kind::Integer {
            min: 0,
            max: 1_000_000,
        },
        default: "0",
        help: "tools/call requests per second of one principal for one tool, unless limits.rate.tools names the tool; more are answered 429 with Retry-After (0: off)",
    },
    SettingDef {
        key: "limits.rate.tools",
        kind: Kind::ToolRates,
        default: "",
        help: "tools with their own rate per principal: TOOL=RATE[:BURST] items, comma-separated, RATE as N (per second), N/s, N/min or N/h (e.g. notes_put=10/min:5,github__create_issue=1/s); 0 exempts a tool",
    },
    SettingDef {
        key: "log.level",
        kind: Kind::LogFilter,
        default: "info",
        help: "log filter: a level (trace, debug, info, warn, error, off) or target=level items, comma-separated",
    },
    SettingDef {
        key: "storage.event_retention_ms",
        kind: Kind::Integer {
            min: 1000,
            max: 31_536_000_000,
        },
        default: "86400000",
        help: "how long stream events stay resumable (Last-Event-ID): older ones are reclaimed, except each stream's last",
    },
    SettingDef {
        key: "storage.reclaim_interval_ms",
        kind: Kind::Integer {
            min: 100,
            max: 86_400_000,
        },
        default: "5000",
        help: "how often a node reclaims storage (in bounded steps between commits): superseded change-log entries already backed up, expired records, old tombstones and events",
    },
    SettingDef {
        key: "storage.tombstone_retention_ms",
        kind: Kind::Integer {
            min: 1000,
            max: 31_536_000_000,
        },
        default: "604800000",
        help: "how long a deletion's tombstone is kept before it is reclaimed",
    },
    SettingDef {
        key: "upstream.breaker_cooldown_ms",
        kind: Kind::Integer {
            min: 100,
            max: 3_600_000,
        },
        default: "10000",
        help: "how long an open circuit breaker refuses calls to an upstream before one trial call",
    },
    SettingDef {
        key: "upstream.breaker_failures",
        kind: Kind::Integer { min: 1, max: 1000 },
        default: "5",
        help: "consecutive failed calls that open an upstream's circuit breaker",
    },
    SettingDef {
        key: "upstream.connect_timeout_ms",
        kind: Kind::Integer {
            min: 100,
            max: 600_000,
        },
        default: "10000",
        help: "longest wait for connecting to and initializing an upstream",
    },
    SettingDef {
        key: "upstream.first_start_timeout_ms",
        kind: Kind::Integer {
            min: 100,
            max: 3_600_000,
        },
        default: "120000",
        help: "longest wait for starting and initializing a stdio upstream until it has connected once on a node (a first start may fetch packages, e.g. npx -y on a cold cache); the larger of this and upstream.connect_timeout_ms applies",
    },
    SettingDef {
        key: "upstream.restart_max_backoff_ms",
        kind: Kind::Integer {
            min: 100,
            max: 3_600_000,
        },
        default: "30000",
        help: "longest wait between reconnections of a dead upstream (stdio: restarts; the backoff doubles from 250 ms)",
    },
    SettingDef {
        key: "upstream.timeout_ms",
        kind: Kind::Integer {
            min: 1,
            max: 600_000,
        },
        default: "30000",
        help: "per-call timeout of upstreams that do not set their own",
    },
];

/// Errors of the configuration service. Messages say what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No such setting.
    #[error("unknown setting '{0}'; known settings: {1}")]
    Unknown(String, String),
    /// The value does not fit the setting.
    #[error("invalid value for {key}: {reason}")]
    Invalid {
        /// The setting.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The stored form of a setting.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSetting {
    value: Value,
    set_millis: u64,
    #[serde(default)]
    set_by: String,
}

/// A setting as shown to operators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigEntry {
    /// Its key.
    pub key: String,
    /// The value in force.
    pub value: Value,
    /// The default.
    pub default: Value,
    /// `store` when set, `default` otherwise.
    pub source: String,
    /// When it was set (Unix ms), if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_millis: Option<u64>,
    /// Which node set it, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_by: Option<String>,
    /// What it does.
    pub help: String,
}

/// The settings in force on a node.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Every setting, by key.
    pub entries: BTreeMap<String, ConfigEntry>,
    /// Upstream connection settings.
    pub upstream: UpstreamSettings,
    /// Built-in catalog name.
    pub catalog: String,
    /// Log filter.
    pub log_level: String,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Connection limits.
    pub http: HttpSettings,
    /// Storage reclamation.
    pub storage: StorageSettings,
    /// Admission: requests per node, queued, queue wait (ms), requests per session.
    pub admission: AdmissionSettings,
    /// Rate limits.
    pub rate: RateSettings,
    /// How long an abandoned legacy request runs on, ms.
    pub abandoned_call_ms: u64,
    /// The longest run of a handler, ms.
    pub max_call_ms: u64,
    /// Resource subscriptions per session.
    pub max_subscriptions_per_session: u64,
    /// Longest subscription URI.
    pub max_uri_bytes: u64,
    /// Bytes of one legacy session's record.
    pub max_session_bytes: u64,
    /// Unexpired tasks of one legacy session.
    pub max_tasks_per_session: u64,
    /// Live legacy sessions one node created.
    pub max_sessions_per_node: u64,
    /// Bytes of one note's text.
    pub max_note_bytes: u64,
    /// Notes the store holds.
    pub max_notes: u64,
    /// Days of audit records kept.
    pub audit_retention_days: u64,
    /// Whether tool calls are audited.
    pub audit_tool_calls: bool,
    /// Longest time before an audit record is covered by a signed checkpoint, ms.
    pub audit_checkpoint_interval_ms: u64,
    /// Change-log sequence of the last configuration change applied (0: none yet).
    pub applied_seq: u64,
    /// When this snapshot was built, Unix ms.
    pub applied_millis: u64,
}

fn def(key: &str) -> Result<&'static SettingDef, ConfigError> {
    SETTINGS.iter().find(|d| d.key == key).ok_or_else(|| {
        ConfigError::Unknown(
            key.to_owned(),
            SETTINGS
                .iter()
                .map(|d| d.key)
                .collect::<Vec<_>>()
                .join(", "),
        )
    })
}

/// Parses the text of a value for `key` into its typed JSON form, checking type and bounds.
pub fn parse_value(key: &str, text: &str) -> Result<Value, ConfigError> {
    let d = def(key)?;
    let invalid = |reason: String| ConfigError::Invalid {
        key: key.to_owned(),
        reason,
    };
    let text = text.trim();
    match d.kind {
        Kind::Integer { min, max } => {
            let n: u64 = text.replace('_', "").parse().map_err(|_| {
                invalid(format!(
                    "'{text}' is not a whole number (expected {min} to {max})"
                ))
            })?;
            if n < min || n > max {
                return Err(invalid(format!("{n} is outside {min} to {max}")));
            }
            Ok(Value::from(n))
        }
        Kind::OneOf(words) => {
            if words.contains(&text) {
                Ok(Value::from(text))
            } else {
                Err(invalid(format!(
                    "'{text}' is not one of {}",
                    words.join(", ")
                )))
            }
        }
        Kind::ToolRates => {
            parse_tool_rates(text).map_err(invalid)?;
            Ok(Value::from(text))
        }
        Kind::LogFilter => {
            if text.is_empty() {
                return Err(invalid("the filter is empty".into()));
            }
            for item in text.split(',') {
                let item = item.trim();
                let level = match item.split_once('=') {
                    Some((target, level)) => {
                        let ok_target = !target.is_empty()
                            && target
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                        if !ok_target {
                            return Err(invalid(format!(
                                "'{target}' is not a module path (letters, digits, '_' and '::')"
                            )));
                        }
                        level
                    }
                    None => item,
                };
                if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                    return Err(invalid(format!(
                        "'{level}' is not a level ({})",
                        LEVELS.join(", ")
                    )));
                }
            }
            Ok(Value::from(text))
        }
    }
}

/// Checks a stored JSON value against its setting (used when folding records).
fn check_stored(key: &str, value: &Value) -> Result<Value, ConfigError> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    };
    parse_value(key, &text)
}

fn default_value(d: &SettingDef) -> Value {
    parse_value(d.key, d.default).expect("defaults are valid")
}

impl ConfigEntry {
    /// Setting `d` at its default value.
    fn default_of(d: &SettingDef) -> ConfigEntry {
        let default = default_value(d);
        ConfigEntry {
            key: d.key.to_owned(),
            value: default.clone(),
            default,
            source: "default".into(),
            set_millis: None,
            set_by: None,
            help: d.help.to_owned(),
        }
    }
}

/// Folds stored settings into a snapshot.
fn fold(stored: &BTreeMap<String, StoredSetting>, applied_seq: u64, now: u64) -> Snapshot {
    let mut entries = BTreeMap::new();
    for d in SETTINGS {
        let mut entry = ConfigEntry::default_of(d);
        if let Some(s) = stored.get(d.key) {
            match check_stored(d.key, &s.value) {
                Ok(v) => {
                    entry.value = v;
                    entry.source = "store".into();
                    entry.set_millis = Some(s.set_millis);
                    entry.set_by = Some(s.set_by.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a stored setting; the default holds")
                }
            }
        }
        entries.insert(d.key.to_owned(), entry);
    }
    let int = |k: &str| entries[k].value.as_u64().unwrap_or_default();
    let text = |k: &str| entries[k].value.as_str().unwrap_or_default().to_owned();
    Snapshot {
        upstream: UpstreamSettings {
            timeout_ms: int("upstream.timeout_ms"),
            breaker_failures: int("upstream.breaker_failures") as u32,
            breaker_cooldown_ms: int("upstream.breaker_cooldown_ms"),
            restart_max_backoff_ms: int("upstream.restart_max_backoff_ms"),
            connect_timeout_ms: int("upstream.connect_timeout_ms"),
            first_start_timeout_ms: int("upstream.first_start_timeout_ms"),
        },
        catalog: text("catalog"),
        log_level: text("log.level"),
        max_body_bytes: int("limits.max_body_bytes"),
        http: HttpSettings {
            header_read_timeout_ms: int("http.header_read_timeout_ms"),
            body_read_timeout_ms: int("http.body_read_timeout_ms"),
            max_connections: int("http.max_connections"),
            max_connections_per_ip: int("http.max_connections_per_ip"),
            max_header_bytes: int("http.max_header_bytes"),
            max_headers: int("http.max_headers"),
        },
        storage: StorageSettings {
            reclaim_interval_ms: int("storage.reclaim_interval_ms"),
            tombstone_retention_ms: int("storage.tombstone_retention_ms"),
            event_retention_ms: int("storage.event_retention_ms"),
        },
        admission: AdmissionSettings {
            max_requests: int("limits.max_requests"),
            max_queued: int("limits.max_queued_requests"),
            queue_wait_ms: int("limits.queue_wait_ms"),
            max_requests_per_session: int("limits.max_requests_per_session"),
            max_queue_delay_ms: int("limits.max_queue_delay_ms"),
        },
        rate: RateSettings {
            per_ip_rps: int("limits.rate.per_ip_rps"),
            per_ip_burst: int("limits.rate.per_ip_burst"),
            per_principal_rps: int("limits.rate.per_principal_rps"),
            per_principal_burst: int("limits.rate.per_principal_burst"),
            per_tool_rps: int("limits.rate.per_tool_rps"),
            per_tool_burst: int("limits.rate.per_tool_burst"),
            // Checked before it was kept: it parses.
            tools: parse_tool_rates(&text("limits.rate.tools")).unwrap_or_default(),
            max_keys: int("limits.rate.max_keys"),
        },
        abandoned_call_ms: int("limits.abandoned_call_ms"),
        max_call_ms: int("limits.max_call_ms"),
        max_subscriptions_per_session: int("limits.max_subscriptions_per_session"),
        max_uri_bytes: int("limits.max_uri_bytes"),
        max_session_bytes: int("limits.max_session_bytes"),
        max_tasks_per_session: int("limits.max_tasks_per_session"),
        max_sessions_per_node: int("limits.max_sessions_per_node"),
        max_note_bytes: int("limits.max_note_bytes"),
        max_notes: int("limits.max_notes"),
        audit_retention_days: int("audit.retention_days"),
        audit_tool_calls: text("audit.tool_calls") == "on",
        audit_checkpoint_interval_ms: int("audit.checkpoint_interval_ms"),
        entries,
        applied_seq,
        applied_millis: now,
    }
}

/// The configuration service of one node. Cheap to clone.
#[derive(Clone)]
pub struct ConfigService {
    store: Arc<dyn Store>,
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    upstream: Arc<watch::Sender<UpstreamSettings>>,
}

impl ConfigService {
    /// Reads the stored settings and starts watching the store for changes.
    pub async fn start(store: Arc<dyn Store>) -> Result<ConfigService, ConfigError> {
        // Subscribe before reading, so that no change falls between the read and the feed.
        let feed = store.subscribe();
        let seq = store.last_seq().await?;
        let stored = load_all(&*store).await?;
        let snap = fold(&stored, seq, store.clock().wall_millis());
        let (upstream, _) = watch::channel(snap.upstream.clone());
        let (tx, _) = watch::channel(Arc::new(snap));
        let svc = ConfigService {
            store,
            tx: Arc::new(tx),
            upstream: Arc::new(upstream),
        };
        svc.spawn_watcher(feed, stored);
        Ok(svc)
    }

    fn spawn_watcher(
        &self,
        mut feed: broadcast::Receiver<Arc<haven_state::LogEntry>>,
        mut stored: BTreeMap<String, StoredSetting>,
    ) {
        let store = self.store.clone();
        let tx = Arc::downgrade(&self.tx);
        let upstream = Arc::downgrade(&self.upstream);
        tokio::spawn(async move {
            loop {
                let (seq, changed) = match feed.recv().await {
                    Ok(entry) => match &entry.change {
                        Change::Record(r) if r.namespace == CONFIG_NS => {
                            match &r.value {
                                Some(v) => match serde_json::from_slice::<StoredSetting>(v) {
                                    Ok(s) => {
                                        stored.insert(r.key.clone(), s);
                                    }
                                    Err(e) => {
                                        tracing::warn!(key = %r.key, error = %e, "unreadable setting record")
                                    }
                                },
                                None => {
                                    stored.remove(&r.key);
                                }
                            }
                            (entry.seq, true)
                        }
                        _ => (entry.seq, false),
                    },
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Changes were missed: read everything again.
                        let seq = store.last_seq().await.unwrap_or_default();
                        match load_all(&*store).await {
                            Ok(s) => {
                                stored = s;
                                (seq, true)
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "re-reading settings failed");
                                continue;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if !changed {
                    continue;
                }
                let (Some(tx), Some(upstream)) = (tx.upgrade(), upstream.upgrade()) else {
                    break;
                };
                let snap = fold(&stored, seq, store.clock().wall_millis());
                upstream.send_if_modified(|u| {
                    if *u != snap.upstream {
                        *u = snap.upstream.clone();
                        true
                    } else {
                        false
                    }
                });
                tx.send_replace(Arc::new(snap));
            }
        });
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// A receiver of the upstream settings alone (changes only when they change).
    pub fn upstream_settings(&self) -> watch::Receiver<UpstreamSettings> {
        self.upstream.subscribe()
    }

    /// Sets `key` to the value written as `text`, after checking it. Returns the entry as
    /// stored. Every node (this one included) applies it when its watcher sees the change.
    pub async fn set(&self, key: &str, text: &str) -> Result<ConfigEntry, ConfigError> {
        let value = parse_value(key, text)?;
        let d = def(key)?;
        let set_millis = self.store.clock().wall_millis();
        let set_by = self.store.origin().to_string();
        let rec = StoredSetting {
            value: value.clone(),
            set_millis,
            set_by: set_by.clone(),
        };
        self.store
            .commit(Batch::new().put(
                CONFIG_NS,
                key,
                serde_json::to_vec(&rec).expect("a setting serializes"),
            ))
            .await?;
        Ok(ConfigEntry {
            key: key.to_owned(),
            value,
            default: default_value(d),
            source: "store".into(),
            set_millis: Some(set_millis),
            set_by: Some(set_by),
            help: d.help.to_owned(),
        })
    }

    /// Returns `key` to its default (a tombstone).
    pub async fn unset(&self, key: &str) -> Result<ConfigEntry, ConfigError> {
        let d = def(key)?;
        self.store
            .commit(Batch::new().delete(CONFIG_NS, key))
            .await?;
        Ok(ConfigEntry::default_of(d))
    }

    /// Every setting as stored now (read from the store, not from this node's snapshot).
    pub async fn list(&self) -> Result<Vec<ConfigEntry>, ConfigError> {
        let stored = load_all(&*self.store).await?;
        let snap = fold(&stored, 0, 0);
        Ok(snap.entries.into_values().collect())
    }

    /// One setting as stored now.
    pub async fn get(&self, key: &str) -> Result<ConfigEntry, ConfigError> {
        def(key)?;
        let list = self.list().await?;
        Ok(list
            .into_iter()
            .find(|e| e.key == key)
            .expect("every known key is listed"))
    }
}

async fn load_all(store: &dyn Store) -> Result<BTreeMap<String, StoredSetting>, ConfigError> {
    let mut out = BTreeMap::new();
    for r in store.scan_all(CONFIG_NS, "").await? {
        match serde_json::from_slice::<StoredSetting>(r.value()) {
            Ok(s) => {
                out.insert(r.record.key, s);
            }
            Err(e) => {
                tracing::warn!(key = %r.record.key, error = %e, "unreadable setting record")
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_against_their_setting() {
        assert_eq!(
            parse_value("upstream.timeout_ms", "1500").unwrap(),
            Value::from(1500)
        );
        assert!(parse_value("upstream.timeout_ms", "0").is_err());
        assert!(parse_value("upstream.timeout_ms", "fast").is_err());
        assert!(parse_value("catalog", "conformance").is_ok());
        assert!(parse_value("catalog", "other").is_err());
        assert!(parse_value("log.level", "debug,haven_federation=trace").is_ok());
        assert!(parse_value("log.level", "loud").is_err());
        let e = parse_value("no.such", "1").unwrap_err().to_string();
        assert!(
            e.contains("known settings") && e.contains("upstream.timeout_ms"),
            "{e}"
        );
    }

    #[test]
    fn tool_rates_are_checked_and_fold_into_the_snapshot() {
        let rates = parse_tool_rates(" notes_put=10/min:5, gh__issue=1 ,slow=2/h").unwrap();
        assert_eq!(
            rates["notes_put"],
            ToolRate {
                count: 10,
                period_secs: 60,
                burst: Some(5)
            }
        );
        assert_eq!(rates["gh__issue"].period_secs, 1);
        assert_eq!(rates["gh__issue"].burst, None);
        assert_eq!(rates["slow"].period_secs, 3600);
        assert!(parse_tool_rates("").unwrap().is_empty());
        for bad in [
            "notes_put",
            "=5",
            "a b=5",
            "x=5/day",
            "x=five",
            "x=5:0",
            "x=1,x=2",
            "x=2000000",
        ] {
            assert!(parse_value("limits.rate.tools", bad).is_err(), "{bad:?}");
        }
        let mut stored = BTreeMap::new();
        stored.insert(
            "limits.rate.tools".to_owned(),
            StoredSetting {
                value: Value::from("notes_put=1/s:2"),
                set_millis: 1,
                set_by: "n1".into(),
            },
        );
        stored.insert(
            "limits.rate.per_ip_rps".to_owned(),
            StoredSetting {
                value: Value::from(50),
                set_millis: 1,
                set_by: "n1".into(),
            },
        );
        let snap = fold(&stored, 1, 1);
        assert_eq!(snap.rate.per_ip_rps, 50);
        assert_eq!(snap.rate.tools["notes_put"].burst, Some(2));
        let defaults = fold(&BTreeMap::new(), 0, 0);
        assert_eq!(
            (
                defaults.rate.per_ip_rps,
                defaults.rate.per_principal_rps,
                defaults.rate.per_tool_rps
            ),
            (0, 0, 0),
            "rate limits are off unless set"
        );
        assert!(defaults.rate.tools.is_empty());
        assert_eq!(defaults.http.max_header_bytes, 65536);
    }

    #[test]
    fn defaults_fold_into_a_snapshot() {
        let snap = fold(&BTreeMap::new(), 0, 0);
        assert_eq!(snap.upstream, UpstreamSettings::default());
        assert_eq!(snap.catalog, "default");
        assert_eq!(snap.max_body_bytes, 4 * 1024 * 1024);
        assert!(snap.entries.values().all(|e| e.source == "default"));
    }
}
