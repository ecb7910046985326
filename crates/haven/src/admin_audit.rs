//! The audit log on the admin API: every control-plane change made through it is recorded
//! (one layer, [`record_changes`], that names the action and target from the method and path
//! and the outcome from the answer's status), refused admin credentials are recorded as
//! `auth.failure`, and `/admin/v1/audit/...` serves the log to `haven audit`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use haven_audit::{AUDIT_NS, Actor, Event, Outcome, Target, actions};
use serde_json::{Value, json};

use crate::admin::{Admin, error};

type S = State<Arc<Admin>>;

/// How long a control-plane change waits for its audit record to be committed.
const RECORD_WAIT: Duration = Duration::from_secs(10);
/// Largest admin request body the recording layer reads to find a name in it.
const MAX_NAMED_BODY: usize = 1024 * 1024;

/// The routes.
pub fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route("/admin/v1/audit/records", get(records))
        .route("/admin/v1/audit/verify", post(verify))
        .route("/admin/v1/audit/checkpoint", post(checkpoint))
}

/// Who made an admin request: the principal another layer established (an OAuth token or API
/// key with an admin role), else the break-glass admin token.
fn actor(request: &axum::extract::Request) -> Actor {
    request
        .extensions()
        .get::<haven_auth::Principal>()
        .map(Actor::principal)
        .unwrap_or(Actor::AdminToken)
}

/// Percent-decoding of a path segment (names are ASCII; anything odd stays as it is).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The action and target of a change, from its method and path (`None`: not a change).
/// `body_name`: the `name` field of the body, for the routes that take the name there.
fn change_of(
    method: &Method,
    path: &str,
    query: &str,
    region: &str,
    body_name: Option<String>,
) -> Option<(&'static str, Target)> {
    let rest = path.strip_prefix("/admin/v1/")?;
    let (head, name) = match rest.split_once('/') {
        Some((h, n)) => (h, Some(decode(n))),
        None => (rest, None),
    };
    let named = |kind, n: Option<String>| Target::named(kind, n.as_deref().unwrap_or(""));
    Some(match (method.as_str(), head, name.as_deref()) {
        ("POST", "registry", None) => (actions::REGISTRY_ADD, named("upstream", body_name)),
        ("PUT", "registry", Some(_)) => (actions::REGISTRY_ADD, named("upstream", name)),
        ("DELETE", "registry", Some(_)) => (actions::REGISTRY_REMOVE, named("upstream", name)),
        ("PUT", "config", Some(_)) => (actions::CONFIG_SET, named("setting", name)),
        ("DELETE", "config", Some(_)) => (actions::CONFIG_UNSET, named("setting", name)),
        ("PUT", "secrets", Some(_)) => (actions::SECRETS_SET, named("secret", name)),
        ("DELETE", "secrets", Some(_)) => (actions::SECRETS_DELETE, named("secret", name)),
        ("POST", "keys", Some("rotate")) => (actions::KEYS_ROTATE, Target::kind("keys")),
        ("POST", "keys", Some("retire")) => (actions::KEYS_RETIRE, named("key", body_name)),
        ("POST", "regions", Some("promote")) => {
            (actions::REGION_PROMOTE, Target::named("region", region))
        }
        ("POST", "regions", Some("demote")) => {
            (actions::REGION_DEMOTE, Target::named("region", region))
        }
        ("POST", "regions", Some("takeover")) => {
            let lost = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("region="))
                .map(decode)
                .unwrap_or_default();
            (actions::REGION_TAKEOVER, Target::named("region", &lost))
        }
        ("POST", "auth", Some("keys")) => (actions::AUTH_KEY_CREATE, named("api-key", body_name)),
        ("POST", "auth", Some(n)) if n.starts_with("keys/") && n.ends_with("/revoke") => {
            let id = n["keys/".len()..n.len() - "/revoke".len()].to_owned();
            (actions::AUTH_KEY_REVOKE, named("api-key", Some(id)))
        }
        ("POST", "auth", Some("rules")) => (actions::AUTH_RULE_SET, named("rule", body_name)),
        ("DELETE", "auth", Some(n)) if n.starts_with("rules/") => {
            let rule = n["rules/".len()..].to_owned();
            (actions::AUTH_RULE_REMOVE, named("rule", Some(rule)))
        }
        ("POST", "audit", Some("checkpoint")) => (actions::AUDIT_CHECKPOINT, Target::kind("audit")),
        // Reads that take a body.
        ("POST", "audit", Some("verify")) | ("POST", "backup", Some("verify")) => return None,
        // Any other change (a route added later and not named above yet) is still recorded.
        _ => (actions::ADMIN_CHANGE, Target::named("path", path)),
    })
}

/// Records every control-plane change made through the admin API with its outcome (after the
/// change; waits for the record's commit, bounded).
pub async fn record_changes(
    State(admin): S,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().clone();
    if method == Method::GET || method == Method::HEAD {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let who = actor(&request);
    // The routes that take the name in the body: read it (bounded) and hand it on.
    let needs_body = (method == Method::POST
        && matches!(
            path.as_str(),
            "/admin/v1/registry"
                | "/admin/v1/keys/retire"
                | "/admin/v1/auth/keys"
                | "/admin/v1/auth/rules"
        ))
    .then_some(());
    let (request, body_name) = match needs_body {
        None => (request, None),
        Some(()) => {
            let (parts, body) = request.into_parts();
            let bytes = match axum::body::to_bytes(body, MAX_NAMED_BODY).await {
                Ok(b) => b,
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request body is larger than {MAX_NAMED_BODY} bytes"),
                    );
                }
            };
            let name = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
                v.get("name")
                    .or_else(|| v.get("kid"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
            (
                axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)),
                name,
            )
        }
    };
    let Some((action, target)) = change_of(&method, &path, &query, &admin.region, body_name) else {
        return next.run(request).await;
    };
    let response = next.run(request).await;
    let outcome = Outcome::from_status(response.status().as_u16());
    let event = Event::new(who, action, target, outcome);
    if let Err(e) = admin.control.audit.record_wait(event, RECORD_WAIT).await {
        tracing::warn!(error = %e, action, "recording a control-plane change in the audit log");
    }
    response
}

/// Records refused admin credentials (without waiting: a flood of them fills the queue, and
/// what does not fit is counted and recorded as dropped).
pub fn auth_failure(admin: &Admin) {
    if let Some(m) = haven_telemetry::get() {
        m.auth_failures.inc();
    }
    admin.control.audit.record(Event::new(
        Actor::Unauthenticated,
        actions::AUTH_FAILURE,
        Target::kind("admin-api"),
        Outcome::Denied,
    ));
}

/// Records an admin request refused because the principal's role does not allow it.
pub fn role_denied(admin: &Admin, principal: &haven_auth::Principal, path: &str) {
    if let Some(m) = haven_telemetry::get() {
        m.calls_denied.inc();
    }
    admin.control.audit.record(Event::new(
        Actor::principal(principal),
        actions::CALL_DENIED,
        Target::named("path", path),
        Outcome::Denied,
    ));
}

#[derive(serde::Deserialize)]
struct RecordsQuery {
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    /// Only keys starting with this (`r/`: records).
    #[serde(default)]
    prefix: Option<String>,
}

/// A page of the log as stored: `{items: [{key, value}], next_after}`. Each value is the
/// stored JSON byte for byte (so that its hash can be checked elsewhere); a value that is not
/// JSON (damaged) comes as `{key, unreadable: "<text>"}`.
async fn records(State(admin): S, Query(q): Query<RecordsQuery>) -> Response {
    let limit = q.limit.unwrap_or(500).clamp(1, 2000);
    let store = admin.engine.store();
    let prefix = q.prefix.unwrap_or_default();
    match store
        .scan(AUDIT_NS, &prefix, q.after.as_deref(), limit)
        .await
    {
        Ok(page) => {
            let mut items = Vec::with_capacity(page.records.len());
            for r in &page.records {
                let text = String::from_utf8_lossy(r.value());
                let item = match serde_json::value::RawValue::from_string(text.to_string()) {
                    Ok(raw) => json!({ "key": r.record.key, "value": raw }),
                    Err(_) => json!({ "key": r.record.key, "unreadable": text }),
                };
                items.push(item);
            }
            (
                StatusCode::OK,
                axum::Json(json!({ "items": items, "next_after": page.next_after })),
            )
                .into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reading the audit log: {e}"),
        ),
    }
}

#[derive(serde::Deserialize, Default)]
struct VerifyBody {
    #[serde(default)]
    trusted_keys: Vec<String>,
}

/// Verifies the whole log as this node's store holds it.
async fn verify(State(admin): S, body: Bytes) -> Response {
    let b: VerifyBody = if body.is_empty() {
        VerifyBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the request body is not {{\"trusted_keys\": [\"<hex>\", ...]}}: {e}"),
                );
            }
        }
    };
    for k in &b.trusted_keys {
        if haven_audit::key::parse_public(k).is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{k:?} is not an Ed25519 public key (64 hex characters, as `haven audit verify` prints them)"
                ),
            );
        }
    }
    match haven_audit::verify(&**admin.engine.store(), &b.trusted_keys).await {
        Ok(report) => {
            let mut v = serde_json::to_value(&report).unwrap_or_default();
            // The public keys, so that an operator can pin them (`--trusted-key`).
            let keys = admin
                .engine
                .store()
                .scan_all(AUDIT_NS, "k/")
                .await
                .unwrap_or_default();
            v["published_keys"] = keys
                .iter()
                .filter_map(|r| serde_json::from_slice::<Value>(r.value()).ok())
                .collect();
            (StatusCode::OK, axum::Json(v)).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reading the audit log: {e}"),
        ),
    }
}

/// Signs a checkpoint of this node's chain now.
async fn checkpoint(State(admin): S) -> Response {
    match admin.control.audit.checkpoint_now().await {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(json!({ "chain": admin.control.audit.chain() })),
        )
            .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
