//! What an audit record holds, and what callers give to make one.
//!
//! Callers never hand over free text that could carry a secret: the action is a `&'static str`
//! (a constant of the code), the target is built from a kind and a *name* ([`Target`]), the
//! outcome from a fixed set ([`Outcome`]: an error is a constant reason or an HTTP status), and
//! the principal from an [`Actor`] (a [`Principal`]'s id, or a fixed word: the admin token
//! itself is never taken).

use haven_auth::Principal;
use serde::{Deserialize, Serialize};

/// Longest target name kept; a longer one is cut (names are short; this bounds a record).
pub const MAX_TARGET_CHARS: usize = 200;

/// Who did it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// An authenticated or anonymous MCP caller, by [`Principal::id`].
    Principal(String),
    /// The break-glass admin token (the token's value is never recorded).
    AdminToken,
    /// The local operator (a command run on the node's own data, without the admin API).
    Operator,
    /// A caller whose credentials were refused (authentication failures).
    Unauthenticated,
    /// Haven itself (retention pruning, dropped-record notes).
    System,
}

impl Actor {
    /// The actor for `principal`.
    pub fn principal(principal: &Principal) -> Actor {
        Actor::Principal(principal.id())
    }

    /// The name recorded.
    pub fn id(&self) -> String {
        match self {
            Actor::Principal(id) => id.clone(),
            Actor::AdminToken => "admin-token".into(),
            Actor::Operator => "operator".into(),
            Actor::Unauthenticated => "unauthenticated".into(),
            Actor::System => "system".into(),
        }
    }
}

/// What was acted on: a kind and a name (`upstream:github`, `setting:log.level`,
/// `secret:gh_token`, `tool:notes_add`). Only names: a secret's value or a token has no
/// business here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target(String);

impl Target {
    /// `kind:name`, the name cut to [`MAX_TARGET_CHARS`] characters and its control characters
    /// replaced.
    pub fn named(kind: &'static str, name: &str) -> Target {
        let name: String = name
            .chars()
            .take(MAX_TARGET_CHARS)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        Target(format!("{kind}:{name}"))
    }

    /// Just a kind, when there is no name (`keys`, `region`).
    pub fn kind(kind: &'static str) -> Target {
        Target(kind.to_owned())
    }

    /// The text recorded.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused: not authenticated or not allowed.
    Denied,
    /// Failed, for a reason named by a constant of the code.
    Error(&'static str),
    /// Failed with this HTTP status.
    Status(u16),
}

impl Outcome {
    /// The outcome an HTTP status means: 2xx ok, 401 and 403 denied, else an error.
    pub fn from_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Ok,
            401 | 403 => Outcome::Denied,
            s => Outcome::Status(s),
        }
    }

    /// The text recorded: `ok`, `denied` or `error: …`.
    pub fn text(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Denied => "denied".into(),
            Outcome::Error(why) => format!("error: {why}"),
            Outcome::Status(s) => format!("error: http {s}"),
        }
    }
}

/// One thing to record.
#[derive(Clone, Debug)]
pub struct Event {
    /// Who.
    pub actor: Actor,
    /// What, e.g. `registry.add` (a constant: see the `actions` module).
    pub action: &'static str,
    /// On what.
    pub target: Target,
    /// How it ended.
    pub outcome: Outcome,
    /// The request's trace id, if it has one.
    pub trace_id: Option<String>,
}

impl Event {
    /// An event without a trace id.
    pub fn new(actor: Actor, action: &'static str, target: Target, outcome: Outcome) -> Event {
        Event {
            actor,
            action,
            target,
            outcome,
            trace_id: None,
        }
    }

    /// The same event with a trace id (hex and `-` only are kept).
    pub fn with_trace(mut self, trace_id: &str) -> Event {
        let t: String = trace_id
            .chars()
            .filter(|c| c.is_ascii_hexdigit() || *c == '-')
            .take(64)
            .collect();
        self.trace_id = (!t.is_empty()).then_some(t);
        self
    }
}

/// The actions Haven records.
pub mod actions {
    /// An upstream added or replaced.
    pub const REGISTRY_ADD: &str = "registry.add";
    /// An upstream removed.
    pub const REGISTRY_REMOVE: &str = "registry.remove";
    /// A setting set.
    pub const CONFIG_SET: &str = "config.set";
    /// A setting unset (back to its default).
    pub const CONFIG_UNSET: &str = "config.unset";
    /// A secret set (its name only).
    pub const SECRETS_SET: &str = "secrets.set";
    /// A secret deleted.
    pub const SECRETS_DELETE: &str = "secrets.delete";
    /// Key-encryption and request-state keys rotated.
    pub const KEYS_ROTATE: &str = "secrets.rotate_key";
    /// A request-state key retired.
    pub const KEYS_RETIRE: &str = "keys.retire";
    /// This region promoted to primary.
    pub const REGION_PROMOTE: &str = "region.promote";
    /// This region demoted.
    pub const REGION_DEMOTE: &str = "region.demote";
    /// A new region built from another region's backups (`haven region bootstrap`).
    pub const REGION_BOOTSTRAP: &str = "region.bootstrap";
    /// A lost region's work taken over.
    pub const REGION_TAKEOVER: &str = "region.takeover";
    /// Any other change through the admin API (target: its path).
    pub const ADMIN_CHANGE: &str = "admin.change";
    /// An API key created.
    pub const AUTH_KEY_CREATE: &str = "auth.key.create";
    /// An API key revoked.
    pub const AUTH_KEY_REVOKE: &str = "auth.key.revoke";
    /// An authorization rule created or replaced.
    pub const AUTH_RULE_SET: &str = "auth.rule.set";
    /// An authorization rule removed.
    pub const AUTH_RULE_REMOVE: &str = "auth.rule.remove";
    /// Credentials refused.
    pub const AUTH_FAILURE: &str = "auth.failure";
    /// A call refused by the authorization rules.
    pub const CALL_DENIED: &str = "call.denied";
    /// A tool called (only with `audit.tool_calls` on).
    pub const TOOLS_CALL: &str = "tools.call";
    /// Old audit segments removed by retention.
    pub const AUDIT_PRUNE: &str = "audit.prune";
    /// Records not written because the queue was full.
    pub const AUDIT_DROPPED: &str = "audit.dropped";
    /// A checkpoint signed on request.
    pub const AUDIT_CHECKPOINT: &str = "audit.checkpoint";
}

/// A prefix of a chain removed by retention: its records up to `through` are gone, the last of
/// them hashed to `last_hash` (the link the chain's first remaining record carries).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// The chain.
    pub chain: String,
    /// Last sequence removed.
    pub through: u64,
    /// SHA-256 (hex) of the stored bytes of record `through`.
    pub last_hash: String,
}

/// An audit record as stored (JSON). Its SHA-256 is taken over the stored bytes exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The chain it belongs to: `<region>/<node>` of the node that wrote it.
    pub chain: String,
    /// Its place in the chain, from 1, without gaps.
    pub seq: u64,
    /// SHA-256 (hex) of the stored bytes of record `seq - 1` of the chain; 64 zeros for the
    /// first.
    pub prev: String,
    /// When it happened, wall-clock Unix ms of the writing node.
    pub at_millis: u64,
    /// The node's hybrid logical clock then (orders records of different chains).
    pub hlc: u64,
    /// Who: [`Actor::id`].
    pub principal: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// How it ended.
    pub outcome: String,
    /// The request's trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The node that did it.
    pub node: String,
    /// Its region.
    pub region: String,
    /// For `audit.prune`: every chain prefix removed so far that this record explains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<Pruned>,
}

/// The day (Unix ms / one day) a record of `at_millis` belongs to: its retention segment.
pub fn day_of(at_millis: u64) -> u64 {
    at_millis / DAY_MILLIS
}

/// One day in ms.
pub const DAY_MILLIS: u64 = 86_400_000;

/// A signed checkpoint: the node vouches that record `seq` of `chain` hashed to `hash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The chain.
    pub chain: String,
    /// The record vouched for (the chain up to it is covered through the links).
    pub seq: u64,
    /// SHA-256 (hex) of its stored bytes.
    pub hash: String,
    /// When it was signed, Unix ms.
    pub at_millis: u64,
    /// The signing key's id.
    pub kid: String,
    /// Ed25519 signature (hex) of [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    /// The bytes signed.
    pub fn message(chain: &str, seq: u64, hash: &str, at_millis: u64, kid: &str) -> Vec<u8> {
        format!("haven-audit-checkpoint/v1\n{chain}\n{seq}\n{hash}\n{at_millis}\n{kid}")
            .into_bytes()
    }
}

/// The head of a chain: its last record, written in the same commit as that record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The chain.
    pub chain: String,
    /// Its last sequence.
    pub seq: u64,
    /// SHA-256 (hex) of that record's bytes.
    pub hash: String,
    /// When that record was made.
    pub at_millis: u64,
}

/// A published checkpoint public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    /// Its id.
    pub kid: String,
    /// The Ed25519 public key, hex.
    pub public_key: String,
    /// The chain it signs for.
    pub chain: String,
    /// When it was first published, Unix ms.
    pub created_millis: u64,
}
