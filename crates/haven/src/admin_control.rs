//! Admin routes of the control plane: `/admin/v1/registry`, `/admin/v1/config`,
//! `/admin/v1/secrets`, `/admin/v1/keys`, `/admin/v1/auth/keys` (API keys) and
//! `/admin/v1/auth/rules` (authorization rules).
//!
//! Bodies are parsed by hand (not axum's `Json` extractor) so that every bad body gets the same
//! `{"error": ...}` shape as every other admin error.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use haven_auth::ApiKeyError;
use haven_control::config::ConfigError;
use haven_control::registry::{RegistryError, UpstreamSpec};
use haven_secrets::SecretsError;
use serde_json::{Value, json};

use crate::admin::{Admin, error};

type S = State<Arc<Admin>>;

/// The routes.
pub fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route("/admin/v1/registry", get(registry_list).post(registry_add))
        .route(
            "/admin/v1/registry/{name}",
            get(registry_show).put(registry_put).delete(registry_remove),
        )
        .route("/admin/v1/config", get(config_list))
        .route(
            "/admin/v1/config/{key}",
            get(config_get).put(config_set).delete(config_unset),
        )
        .route("/admin/v1/secrets", get(secrets_list))
        .route(
            "/admin/v1/secrets/{*name}",
            axum::routing::put(secrets_set).delete(secrets_delete),
        )
        .route("/admin/v1/keys", get(keys_show))
        .route("/admin/v1/keys/rotate", post(keys_rotate))
        .route("/admin/v1/keys/retire", post(keys_retire))
        .route(
            "/admin/v1/auth/keys",
            get(api_keys_list).post(api_keys_create),
        )
        .route("/admin/v1/auth/keys/{id}", get(api_keys_show))
        .route("/admin/v1/auth/keys/{id}/revoke", post(api_keys_revoke))
        .route("/admin/v1/auth/rules", get(rules_list).post(rules_put))
        .route(
            "/admin/v1/auth/rules/{name}",
            get(rules_show).delete(rules_remove),
        )
}

fn json_ok(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

#[allow(clippy::result_large_err)]
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid {what}: {e}"),
        )
    })
}

fn registry_error(e: RegistryError) -> Response {
    let status = match &e {
        RegistryError::Invalid(_) | RegistryError::UnknownSecrets(_) => StatusCode::BAD_REQUEST,
        RegistryError::Duplicate(_) => StatusCode::CONFLICT,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::Store(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        RegistryError::Store(haven_state::StoreError::Conflict { .. }) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

fn config_error(e: ConfigError) -> Response {
    let status = match &e {
        ConfigError::Unknown(..) => StatusCode::NOT_FOUND,
        ConfigError::Invalid { .. } => StatusCode::BAD_REQUEST,
        ConfigError::Store(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

fn secrets_error(e: SecretsError) -> Response {
    let status = match &e {
        SecretsError::NotFound(_) => StatusCode::NOT_FOUND,
        SecretsError::Invalid(_) | SecretsError::Reserved(_) => StatusCode::BAD_REQUEST,
        SecretsError::Store(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        SecretsError::UnknownKek { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// An upstream's registry entry with this node's view of its connection. Its URL is shown
/// without credentials and query string (which may hold secrets: the entry is shown with
/// secret references, never values).
fn upstream_view(admin: &Admin, spec: &UpstreamSpec) -> Value {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    if let Some(url) = v.get("url").and_then(Value::as_str) {
        v["url"] = Value::from(haven_control::redact::redact_url(url));
    }
    let status = admin
        .control
        .upstreams
        .status()
        .into_iter()
        .find(|s| s.name == spec.name);
    v["status"] = status
        .map(|s| serde_json::to_value(s).unwrap_or_default())
        .unwrap_or(Value::Null);
    v
}

async fn registry_list(State(admin): S) -> Response {
    match admin.control.registry.list().await {
        Ok(list) => {
            let items: Vec<Value> = list.iter().map(|s| upstream_view(&admin, s)).collect();
            json_ok(StatusCode::OK, json!({ "upstreams": items }))
        }
        Err(e) => registry_error(e),
    }
}

#[derive(serde::Deserialize, Default)]
struct AddQuery {
    #[serde(default)]
    replace: bool,
}

/// A registry entry from JSON, refusing fields that do not belong to its transport (a typo
/// such as `headerz` would otherwise be dropped without a word).
#[allow(clippy::result_large_err)]
fn upstream_from(v: Value) -> Result<UpstreamSpec, Response> {
    const COMMON: &[&str] = &["name", "transport", "timeout_ms", "disabled", "description"];
    let specific: &[&str] = match v.get("transport").and_then(Value::as_str) {
        Some("http") => &["url", "headers"],
        Some("stdio") => &["command", "args", "env", "cwd"],
        _ => &[],
    };
    if let Some(obj) = v.as_object()
        && !specific.is_empty()
    {
        let unknown: Vec<&String> = obj
            .keys()
            .filter(|k| !COMMON.contains(&k.as_str()) && !specific.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown field(s) {} for a {} upstream; its fields are {}",
                    unknown
                        .iter()
                        .map(|k| format!("'{k}'"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    v["transport"].as_str().unwrap_or_default(),
                    COMMON
                        .iter()
                        .chain(specific)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    serde_json::from_value(v).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid upstream entry: {e}"),
        )
    })
}

async fn add(admin: &Admin, spec: UpstreamSpec, replace: bool) -> Response {
    let known = match admin.control.secrets.names().await {
        Ok(n) => n,
        Err(e) => return secrets_error(e),
    };
    match admin.control.registry.add(&spec, &known, replace).await {
        Ok(()) => json_ok(StatusCode::CREATED, upstream_view(admin, &spec)),
        Err(e) => registry_error(e),
    }
}

async fn registry_add(State(admin): S, Query(q): Query<AddQuery>, body: Bytes) -> Response {
    let v: Value = match parse_body(&body, "upstream entry") {
        Ok(v) => v,
        Err(r) => return r,
    };
    match upstream_from(v) {
        Ok(spec) => add(&admin, spec, q.replace).await,
        Err(r) => r,
    }
}

async fn registry_put(State(admin): S, Path(name): Path<String>, body: Bytes) -> Response {
    let mut v: Value = match parse_body(&body, "upstream entry") {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !v.is_object() {
        // Indexing a non-object to set its name below would panic (and drop the connection).
        return error(
            StatusCode::BAD_REQUEST,
            "the request body is not a valid upstream entry: expected a JSON object",
        );
    }
    match v.get("name").and_then(Value::as_str) {
        Some(n) if n != name => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body names upstream '{n}' but the path names '{name}'"),
            );
        }
        _ => v["name"] = Value::from(name),
    }
    match upstream_from(v) {
        Ok(spec) => add(&admin, spec, true).await,
        Err(r) => r,
    }
}

async fn registry_show(State(admin): S, Path(name): Path<String>) -> Response {
    match admin.control.registry.get(&name).await {
        Ok(Some(spec)) => json_ok(StatusCode::OK, upstream_view(&admin, &spec)),
        Ok(None) => registry_error(RegistryError::NotFound(name)),
        Err(e) => registry_error(e),
    }
}

async fn registry_remove(State(admin): S, Path(name): Path<String>) -> Response {
    match admin.control.registry.remove(&name).await {
        Ok(()) => json_ok(StatusCode::OK, json!({ "removed": name })),
        Err(e) => registry_error(e),
    }
}

fn in_force(admin: &Admin) -> Value {
    let snap = admin.control.in_force.read().clone();
    let values: serde_json::Map<String, Value> = snap
        .entries
        .iter()
        .map(|(k, e)| (k.clone(), e.value.clone()))
        .collect();
    json!({
        "node": admin.engine.config().node_id,
        "applied_seq": snap.applied_seq,
        "applied_millis": snap.applied_millis,
        "values": values,
    })
}

async fn config_list(State(admin): S) -> Response {
    match admin.control.config.list().await {
        Ok(list) => json_ok(
            StatusCode::OK,
            json!({ "settings": list, "in_force": in_force(&admin) }),
        ),
        Err(e) => config_error(e),
    }
}

async fn config_get(State(admin): S, Path(key): Path<String>) -> Response {
    match admin.control.config.get(&key).await {
        Ok(entry) => {
            let mut v = serde_json::to_value(entry).unwrap_or_default();
            v["in_force"] = in_force(&admin)["values"][&key].clone();
            json_ok(StatusCode::OK, v)
        }
        Err(e) => config_error(e),
    }
}

async fn config_set(State(admin): S, Path(key): Path<String>, body: Bytes) -> Response {
    let v: Value = match parse_body(&body, "JSON object {\"value\": ...}") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let text = match v.get("value") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "send {\"value\": \"...\"} with the new value as a string or number",
            );
        }
    };
    match admin.control.config.set(&key, &text).await {
        Ok(entry) => json_ok(
            StatusCode::OK,
            serde_json::to_value(entry).unwrap_or_default(),
        ),
        Err(e) => config_error(e),
    }
}

async fn config_unset(State(admin): S, Path(key): Path<String>) -> Response {
    match admin.control.config.unset(&key).await {
        Ok(entry) => json_ok(
            StatusCode::OK,
            serde_json::to_value(entry).unwrap_or_default(),
        ),
        Err(e) => config_error(e),
    }
}

#[derive(serde::Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn secrets_list(State(admin): S, Query(q): Query<ListQuery>) -> Response {
    match admin.control.secrets.list().await {
        Ok(list) => {
            let items: Vec<_> = list
                .into_iter()
                .filter(|m| q.all || !m.name.starts_with("system/"))
                .collect();
            json_ok(StatusCode::OK, json!({ "secrets": items }))
        }
        Err(e) => secrets_error(e),
    }
}

async fn secrets_set(State(admin): S, Path(name): Path<String>, body: Bytes) -> Response {
    let v: Value = match parse_body(&body, "JSON object {\"value\": \"...\"}") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let value = match (v.get("value"), v.get("value_base64")) {
        (Some(Value::String(s)), None) => s.as_bytes().to_vec(),
        (None, Some(Value::String(b))) => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(v) => v,
                Err(_) => {
                    return error(StatusCode::BAD_REQUEST, "value_base64 is not valid base64");
                }
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "send {\"value\": \"<text>\"} or {\"value_base64\": \"<bytes>\"}",
            );
        }
    };
    match admin.control.secrets.set_user(&name, &value).await {
        Ok(meta) => json_ok(
            StatusCode::OK,
            serde_json::to_value(meta).unwrap_or_default(),
        ),
        Err(e) => secrets_error(e),
    }
}

#[derive(serde::Deserialize, Default)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn secrets_delete(
    State(admin): S,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    if !q.force {
        match admin.control.registry.list().await {
            Ok(list) => {
                let users: Vec<String> = list
                    .iter()
                    .filter(|s| s.secret_references().contains(&name))
                    .map(|s| s.name.clone())
                    .collect();
                if !users.is_empty() {
                    return error(
                        StatusCode::CONFLICT,
                        format!(
                            "secret '{name}' is used by upstream(s) {}; change them first, or delete with --force (API: ?force=true)",
                            users.join(", ")
                        ),
                    );
                }
            }
            Err(e) => return registry_error(e),
        }
    }
    match admin.control.secrets.delete_user(&name).await {
        Ok(true) => json_ok(StatusCode::OK, json!({ "deleted": name })),
        Ok(false) => secrets_error(SecretsError::NotFound(name)),
        Err(e) => secrets_error(e),
    }
}

async fn keys_show(State(admin): S) -> Response {
    let by_owner = match admin.control.secrets.kek_usage_by_owner().await {
        Ok(u) => u,
        Err(e) => return secrets_error(e),
    };
    // `usage`: every secret a key wraps; `user` and `haven`: users' secrets (what
    // `haven secrets list` shows) and Haven's own (`--all`), by name.
    let usage: serde_json::Map<String, serde_json::Value> = by_owner
        .iter()
        .map(|(k, w)| (k.clone(), json!(w.user + w.haven.len())))
        .collect();
    let owners: serde_json::Map<String, serde_json::Value> = by_owner
        .iter()
        .map(|(k, w)| {
            (
                k.clone(),
                json!({
                    "user": w.user,
                    "haven": w.haven,
                    "described": crate::admin::describe_wrapped(w.user, &w.haven),
                }),
            )
        })
        .collect();
    let ring = admin.engine.keyring();
    json_ok(
        StatusCode::OK,
        json!({
            "kek": {
                "primary": admin.control.secrets.primary_kid(),
                "known": admin.control.secrets.known_kids(),
                "usage": usage,
                "by_owner": owners,
            },
            "request_state": {
                "signing": ring.active_kid(),
                "keys": ring.list().await.unwrap_or_default(),
            },
        }),
    )
}

async fn keys_rotate(State(admin): S) -> Response {
    let report = match admin.control.secrets.rotate_kek().await {
        Ok(r) => r,
        Err(e) => return secrets_error(e),
    };
    let kid = match admin.engine.keyring().rotate().await {
        Ok(k) => k,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the data keys were re-wrapped, but adding a request-state key failed: {e}"
                ),
            );
        }
    };
    json_ok(
        StatusCode::OK,
        json!({ "kek": report, "request_state": { "signing": kid } }),
    )
}

#[derive(serde::Deserialize)]
struct RetireBody {
    kid: String,
}

async fn keys_retire(State(admin): S, body: Bytes) -> Response {
    let b: RetireBody = match parse_body(&body, "JSON object {\"kid\": \"...\"}") {
        Ok(b) => b,
        Err(r) => return r,
    };
    match admin.engine.keyring().retire(&b.kid).await {
        Ok(()) => json_ok(StatusCode::OK, json!({ "retired": b.kid })),
        Err(e) => {
            use haven_mcp::keyring::KeyringError;
            let status = match &e {
                KeyringError::NotFound(_) => StatusCode::NOT_FOUND,
                KeyringError::LastLiveKey(_) | KeyringError::SigningKey(_) => StatusCode::CONFLICT,
                KeyringError::Store(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e.to_string())
        }
    }
}

fn api_key_error(e: ApiKeyError) -> Response {
    let status = match &e {
        ApiKeyError::Invalid(_) => StatusCode::BAD_REQUEST,
        ApiKeyError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiKeyError::AlreadyRevoked { .. } => StatusCode::CONFLICT,
        ApiKeyError::Store(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Who is changing API keys: the authenticated admin principal when the admin API names one,
/// else the holder of the admin token.
fn actor(who: Option<axum::Extension<haven_auth::Principal>>) -> String {
    match who {
        Some(axum::Extension(p)) if !p.is_anonymous() => p.id(),
        _ => "admin-token".to_owned(),
    }
}

/// An API key as the admin API shows it: its record and its state now (never its secret).
fn api_key_view(key: &haven_auth::ApiKey, now: u64) -> Value {
    let mut v = serde_json::to_value(key).unwrap_or_default();
    v["state"] = serde_json::to_value(key.state(now)).unwrap_or_default();
    v
}

async fn api_keys_list(State(admin): S) -> Response {
    let keys = &admin.control.api_keys;
    match keys.list().await {
        Ok(list) => {
            let now = keys.now();
            let items: Vec<Value> = list.iter().map(|k| api_key_view(k, now)).collect();
            json_ok(StatusCode::OK, json!({ "keys": items }))
        }
        Err(e) => api_key_error(e),
    }
}

async fn api_keys_show(State(admin): S, Path(id): Path<String>) -> Response {
    let keys = &admin.control.api_keys;
    match keys.get(&id).await {
        Ok(Some(k)) => json_ok(StatusCode::OK, api_key_view(&k, keys.now())),
        Ok(None) => api_key_error(ApiKeyError::NotFound(id)),
        Err(e) => api_key_error(e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    /// A duration from now (`30d`), an RFC 3339 time, or seconds since the Unix epoch.
    #[serde(default)]
    expires: Option<Value>,
}

async fn api_keys_create(
    State(admin): S,
    who: Option<axum::Extension<haven_auth::Principal>>,
    body: Bytes,
) -> Response {
    const SHAPE: &str = "JSON object {\"name\": ..., \"scopes\": [...], \"groups\": [...], \"expires\": \"30d\" or RFC 3339}";
    let v: Value = match parse_body(&body, SHAPE) {
        Ok(v) => v,
        Err(r) => return r,
    };
    // A struct also reads from an array; only an object is meant.
    if !v.is_object() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid {SHAPE}: expected an object"),
        );
    }
    let b: CreateKeyBody = match serde_json::from_value(v) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the request body is not a valid {SHAPE}: {e}"),
            );
        }
    };
    let keys = &admin.control.api_keys;
    let expires_at = match &b.expires {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => match haven_auth::apikeys::parse_expiry(t, keys.now()) {
            Ok(at) => Some(at),
            Err(e) => return api_key_error(e),
        },
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "expires must be a duration such as \"30d\", an RFC 3339 time, or seconds since the Unix epoch",
            );
        }
    };
    match keys
        .create(&b.name, b.scopes, b.groups, expires_at, &actor(who))
        .await
    {
        Ok((key, presented)) => {
            let mut v = api_key_view(&key, keys.now());
            v["api_key"] = Value::from(presented.expose());
            json_ok(StatusCode::CREATED, v)
        }
        Err(e) => api_key_error(e),
    }
}

async fn api_keys_revoke(
    State(admin): S,
    who: Option<axum::Extension<haven_auth::Principal>>,
    Path(id): Path<String>,
) -> Response {
    let keys = &admin.control.api_keys;
    match keys.revoke(&id, &actor(who)).await {
        Ok(key) => json_ok(StatusCode::OK, api_key_view(&key, keys.now())),
        Err(e) => api_key_error(e),
    }
}

fn rule_error(e: haven_auth::RuleError) -> Response {
    use haven_auth::RuleError;
    let status = match &e {
        RuleError::Invalid(_) => StatusCode::BAD_REQUEST,
        RuleError::NotFound(_) => StatusCode::NOT_FOUND,
        RuleError::Store(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        RuleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Every rule, and whether authorization is open (no rules: everything allowed).
async fn rules_list(State(admin): S) -> Response {
    match admin.control.rules.list().await {
        Ok(rules) => json_ok(
            StatusCode::OK,
            json!({ "open": rules.is_empty(), "rules": rules }),
        ),
        Err(e) => rule_error(e),
    }
}

async fn rules_show(State(admin): S, Path(name): Path<String>) -> Response {
    match admin.control.rules.get(&name).await {
        Ok(Some(r)) => json_ok(StatusCode::OK, json!(r)),
        Ok(None) => rule_error(haven_auth::RuleError::NotFound(name)),
        Err(e) => rule_error(e),
    }
}

/// Creates a rule, or replaces the rule of that name (201 when new, 200 when replaced).
async fn rules_put(
    State(admin): S,
    who: Option<axum::Extension<haven_auth::Principal>>,
    body: Bytes,
) -> Response {
    const SHAPE: &str = "JSON object {\"name\": ..., \"effect\": \"allow\"|\"deny\", \"principals\": [...], \"tools\": [...], \"resources\": [...], \"prompts\": [...], \"description\": ...}";
    let v: Value = match parse_body(&body, SHAPE) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(obj) = v.as_object() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid {SHAPE}: expected an object"),
        );
    };
    if obj.contains_key("updated_by") || obj.contains_key("updated_at") {
        return error(
            StatusCode::BAD_REQUEST,
            "updated_by and updated_at are set by the node, not by the request",
        );
    }
    let rule: haven_auth::Rule = match serde_json::from_value(v) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the request body is not a valid {SHAPE}: {e}"),
            );
        }
    };
    match admin.control.rules.put(rule, &actor(who)).await {
        Ok((rule, replaced)) => {
            let status = if replaced {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            json_ok(status, json!(rule))
        }
        Err(e) => rule_error(e),
    }
}

async fn rules_remove(State(admin): S, Path(name): Path<String>) -> Response {
    match admin.control.rules.remove(&name).await {
        Ok(r) => json_ok(StatusCode::OK, json!(r)),
        Err(e) => rule_error(e),
    }
}
