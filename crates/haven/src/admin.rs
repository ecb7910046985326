//! The node's admin API under `/admin/v1`, protected by a bearer token: node status, backup
//! (status, shipping and verification on demand), the upstream registry, runtime
//! configuration, secrets and key rotation. Every answer is JSON; an error is
//! `{"error": "<what was wrong and what to do>"}` with a 4xx status for bad input (which
//! changes nothing) and 503 when the store cannot take the change now.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use haven_backup::ShipperHandle;
use haven_server::layers::host_origin::{self, AllowedHosts};
use serde_json::json;

/// Who may use the admin API: its token, the names allowed in `Host` and `Origin`, and the
/// authentication of `/mcp` whose tokens and API keys it also takes (`None`: off).
pub struct Access {
    pub token: String,
    pub allowed: AllowedHosts,
    pub authn: Option<Arc<haven_auth::Authenticator>>,
}

/// Shared state of the admin routes.
pub struct Admin {
    token: String,
    /// Authentication of `/mcp` (`None`: off). When on, the admin API also takes its tokens
    /// and API keys, with the rights of the principal's [`haven_auth::AdminRole`].
    authn: Option<Arc<haven_auth::Authenticator>>,
    /// The status page's settings.
    pub(crate) status: crate::status::StatusConfig,
    /// The backup shippers: the main target first, then the additional ones.
    pub(crate) backup: Vec<ShipperHandle>,
    pub(crate) engine: haven_mcp::engine::Engine,
    pub(crate) region: String,
    pub(crate) control: crate::control::Control,
}

/// The admin token: read from `configured`, else from the `HAVEN_ADMIN_TOKEN` environment
/// variable, else from `DATA/admin.token`, created with a random value (mode 0600) when missing.
pub fn load_or_create_token(data: &Path, configured: Option<&Path>) -> Result<(String, PathBuf)> {
    if configured.is_none()
        && let Ok(t) = std::env::var("HAVEN_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        let t = t.trim().to_owned();
        anyhow::ensure!(
            t.len() >= 16,
            "the admin token in HAVEN_ADMIN_TOKEN is shorter than 16 characters"
        );
        return Ok((t, PathBuf::from("$HAVEN_ADMIN_TOKEN")));
    }
    if let Some(path) = configured {
        haven_state::files::check_private_file(path, "admin token file")?;
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("reading the admin token file {}", path.display()))?;
        let t = t.trim().to_owned();
        anyhow::ensure!(
            t.len() >= 16,
            "the admin token in {} is shorter than 16 characters",
            path.display()
        );
        return Ok((t, path.to_owned()));
    }
    let path = data.join("admin.token");
    if path.exists() {
        haven_state::files::check_private_file(&path, "admin token file")?;
    }
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if t.len() >= 16 {
            return Ok((t, path));
        }
    }
    let token = haven_backup::BackupKey::generate().to_hex();
    write_private(&path, token.as_bytes())?;
    Ok((token, path))
}

/// Name of the reserved secret that holds `region`'s admin token (shared store only; one
/// per region, although secrets replicate to every region).
pub fn region_token_secret(region: &str) -> String {
    format!("system/admin-token/{region}")
}

/// Haven's own secrets (reserved `system/...` names) as people read them: "2 request-state
/// signing keys, the admin token of region eu".
pub fn describe_own_secrets(names: &[String]) -> String {
    let signing = names
        .iter()
        .filter(|n| n.starts_with(haven_mcp::keyring::SECRET_PREFIX))
        .count();
    let mut parts = Vec::new();
    match signing {
        0 => {}
        1 => parts.push("a request-state signing key".to_owned()),
        n => parts.push(format!("{n} request-state signing keys")),
    }
    for n in names {
        if let Some(region) = n.strip_prefix("system/admin-token/") {
            parts.push(format!("the admin token of region {region}"));
        } else if !n.starts_with(haven_mcp::keyring::SECRET_PREFIX) {
            parts.push(n.clone());
        }
    }
    parts.join(", ")
}

/// How many secrets a key-encryption key wraps, as people read it: the users' secrets (what
/// `haven secrets list` shows), then Haven's own (`haven secrets list --all`).
pub fn describe_wrapped(user: usize, haven: &[String]) -> String {
    let users = match user {
        1 => "1 secret".to_owned(),
        n => format!("{n} secrets"),
    };
    if haven.is_empty() {
        users
    } else {
        format!(
            "{users} and {} of Haven's own ({})",
            haven.len(),
            describe_own_secrets(haven)
        )
    }
}

/// The admin token of a node on a shared store whose token comes from its data directory
/// (`local`, read from `path`): the region's, so that the CLI with any node's token works
/// against every node of the region. The region's token is a reserved secret in the store,
/// sealed by the region's secrets keys; the first node that finds none makes its own token
/// the region's (compare-and-set: of two nodes starting at once, one wins and both use its
/// token). A node whose file holds another token has the file replaced with the region's.
pub async fn region_token(
    secrets: &haven_secrets::Secrets,
    region: &str,
    local: String,
    path: &Path,
) -> Result<String> {
    let name = region_token_secret(region);
    for _ in 0..3 {
        if let Some(t) = secrets
            .get(&name)
            .await
            .context("reading the region's admin token from the store")?
        {
            let t = String::from_utf8(t.to_vec())
                .context("the region's admin token in the store is not text")?;
            if t != local {
                replace_private(path, t.as_bytes())?;
                tracing::info!(
                    file = %path.display(),
                    "this node's admin token file now holds the region's admin token (shared by every node of the region)"
                );
            }
            return Ok(t);
        }
        if secrets
            .create(&name, local.as_bytes())
            .await
            .context("storing the region's admin token")?
        {
            tracing::info!(
                file = %path.display(),
                "this node's admin token is now the region's (every node of the region takes it)"
            );
            return Ok(local);
        }
    }
    bail!("the region's admin token could not be read or created in the store")
}

/// Replaces `path` with `content`, readable only by its owner (0600), atomically (a
/// temporary file renamed over it).
fn replace_private(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("token.new");
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, content)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Creates a file readable only by its owner (0600); refuses to replace an existing one.
pub fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = haven_state::files::private_options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(content)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The admin routes, and `/metrics` open (for `--metrics-listen`; the admin routes serve it
/// too, behind their credentials). Every admin request's headers are checked as on `/mcp`
/// (`allowed`: the names allowed in `Host` and `Origin`; the headers that must be single),
/// then its bearer token.
pub fn router(
    access: Access,
    backup: Vec<ShipperHandle>,
    engine: haven_mcp::engine::Engine,
    region: String,
    control: crate::control::Control,
    status_config: crate::status::StatusConfig,
) -> (Router, Router) {
    let Access {
        token,
        allowed,
        authn,
    } = access;
    let state = Arc::new(Admin {
        token,
        authn,
        status: status_config,
        backup,
        engine,
        region,
        control,
    });
    let open_metrics = Router::new()
        .route("/metrics", get(crate::metrics::serve))
        .route("/status", get(crate::status::page))
        .with_state(state.clone());
    // The status page's sign-in: outside the credentials check, inside the header checks.
    let login = Router::new()
        .route("/status/login", post(crate::status::login))
        .route("/status/logout", post(crate::status::logout))
        .route_layer(axum::middleware::from_fn_with_state(
            allowed.clone(),
            check_headers,
        ))
        .with_state(state.clone());
    let admin = Router::new()
        .route("/metrics", get(crate::metrics::serve))
        .route("/status", get(crate::status::page))
        .route("/admin/v1/overview", get(crate::status::json))
        .route("/admin/v1/status", get(status))
        .route("/admin/v1/regions", get(regions))
        .route("/admin/v1/regions/promote", post(region_promote))
        .route("/admin/v1/regions/demote", post(region_demote))
        .route("/admin/v1/regions/takeover", post(region_takeover))
        .route("/admin/v1/backup", get(backup_status))
        .route("/admin/v1/backup/now", post(backup_now))
        .route("/admin/v1/backup/verify", post(backup_verify))
        .route("/admin/v1/drills", post(drill_record))
        .merge(crate::admin_control::routes())
        .merge(crate::admin_audit::routes())
        // Inside the token check: only changes by someone let in are recorded as changes.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::admin_audit::record_changes,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        // The status page's cookie becomes its credentials; a refusal, the sign-in form.
        .route_layer(axum::middleware::from_fn(crate::status::cookie_credentials))
        // Runs before the token check: a request whose headers are refused is not looked at.
        .route_layer(axum::middleware::from_fn_with_state(allowed, check_headers))
        .with_state(state)
        .merge(login);
    (admin, open_metrics)
}

/// The checks of `/mcp`'s first layer, answered the admin API's way (`{"error": ...}`): a
/// missing `Host`, a header that must be single given twice or not in visible ASCII (400), a
/// `Host` or `Origin` that is not allowed (403).
async fn check_headers(
    State(allowed): State<AllowedHosts>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match host_origin::check(&allowed, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            tracing::debug!(%refusal, "admin request refused");
            error(refusal.status(), refusal.to_string())
        }
    }
}

/// Every admin route requires the admin token or, when authentication is on, a token or API
/// key of a principal whose role allows the request ([`haven_auth::AdminRole::required`]).
async fn require_token(
    State(admin): State<Arc<Admin>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let refused = match authorize(&admin, request.headers()) {
        Ok(()) => return next.run(request).await,
        Err(r) => r,
    };
    let Some(authn) = admin.authn.as_ref() else {
        crate::admin_audit::auth_failure(&admin);
        return refused;
    };
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
    let principal = match authn.identify(header.as_deref()).await {
        Ok(p) => p,
        Err(haven_auth::AuthError::Unavailable(why)) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return r;
        }
        Err(e) => {
            tracing::debug!(error = %e, "admin credentials refused");
            crate::admin_audit::auth_failure(&admin);
            return error(
                StatusCode::UNAUTHORIZED,
                format!(
                    "{e}; send Authorization: Bearer <the node's admin token, or an access token or API key with the scope or group haven:viewer, haven:operator or haven:admin>"
                ),
            );
        }
    };
    let need = haven_auth::AdminRole::required(request.method().as_str(), request.uri().path());
    let has = haven_auth::AdminRole::of(&principal);
    if has.is_none_or(|r| r < need) {
        crate::admin_audit::role_denied(&admin, &principal, request.uri().path());
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{} {} needs the {} role ({}); {} has {}",
                request.method(),
                request.uri().path(),
                need.as_str(),
                need.grant_name(),
                principal.id(),
                has.map_or("no admin role", |r| r.as_str()),
            ),
        );
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// Whether `token` (the admin token, or with authentication on an access token or API key)
/// may read the admin API (the viewer role); the reason when not.
pub(crate) async fn check_viewer(admin: &Admin, token: &str) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    if let Ok(v) = header::HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(header::AUTHORIZATION, v);
    }
    if authorize(admin, &headers).is_ok() {
        return Ok(());
    }
    let Some(authn) = admin.authn.as_ref() else {
        return Err("That is not this node's admin token.".into());
    };
    let principal = authn
        .identify(Some(&format!("Bearer {token}")))
        .await
        .map_err(|e| format!("Refused: {e}."))?;
    match haven_auth::AdminRole::of(&principal) {
        Some(_) => Ok(()),
        None => Err(format!(
            "{} has no admin role (haven:viewer or higher).",
            principal.id()
        )),
    }
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

// A rejection is returned once per request; boxing it would buy nothing.
#[allow(clippy::result_large_err)]
fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<(), Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .unwrap_or("");
    // Compare without an early exit on the first differing byte.
    let a = given.as_bytes();
    let b = admin.token.as_bytes();
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token: send Authorization: Bearer <token from the node's admin token file>",
        ))
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110 §11.1), so `bearer` and `BEARER` work too; one or more spaces follow it.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

#[allow(clippy::result_large_err)]
fn shipper(admin: &Admin) -> Result<&ShipperHandle, Response> {
    admin.backup.first().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "backup is not enabled on this node; start it with --backup-url and --backup-key-file",
        )
    })
}

/// The region as this node sees it: nodes from their heartbeats, the store's health, backup.
async fn status(State(admin): State<Arc<Admin>>) -> Response {
    let e = &admin.engine;
    let backup = backup_json(&admin).await;
    let mut store = e.store().describe().await;
    if store["backend"] == "nats" {
        // Whether the NATS servers sync every write, as read at start (`--nats-monitor`).
        store["sync"] = crate::nats_sync::found();
    }
    let (delay, shed_permille) = admin.control.admission.delay();
    Json(json!({
        "region": admin.region,
        "node": e.config().node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "draining": e.is_draining(),
        "running_requests": e.running_requests(),
        "running_executions": e.running_executions(),
        "hub_topics": e.hub_topics(),
        "cached_sessions": e.cached_sessions(),
        "live_sessions": e.live_sessions(),
        "admission": {
            "running": admin.control.admission.load().0,
            "queued": admin.control.admission.load().1,
            "delay_ms": delay.as_secs_f64() * 1000.0,
            "shed_permille": shed_permille,
        },
        "nodes": e.members(),
        "clock": {
            "max_offset_ms": e.clock_skew().map(|(o, _)| o),
            "skewed": e.clock_skew().is_some_and(|(_, s)| s),
            "allowed_skew_ms": e.config().max_clock_skew.as_millis() as u64,
        },
        "store": store,
        "reclamation": admin.control.reclaim.lock().clone(),
        "writable": e.store().check_writable().await.map_err(|e| e.to_string()).err(),
        "backup": backup,
        "authorization": {
            "rules": admin.control.policy.current().len(),
            "unreadable": admin.control.policy.current().unreadable(),
        },
        "audit": {
            "chain": admin.control.audit.chain(),
            "written": admin.control.audit.written(),
            "dropped": admin.control.audit.dropped(),
        },
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct RegionsQuery {
    /// Include a digest of the whole state (reads every record: for convergence checks).
    #[serde(default)]
    digest: bool,
    /// List every item of this part of the state (a namespace, or `(events)`) with its
    /// version and a digest of its content: to find which keys two regions disagree on.
    #[serde(default)]
    items: Option<String>,
}

/// This region and every other region as this node sees them: the links that apply their
/// logs here, how far behind each is (entries and seconds), and on request a digest of the
/// state that every region converges to.
async fn regions(State(admin): State<Arc<Admin>>, Query(q): Query<RegionsQuery>) -> Response {
    let e = &admin.engine;
    let peers = match &admin.control.regions {
        Some(r) => r.status().await,
        None => Vec::new(),
    };
    let members = e.members();
    let roles = haven_cluster::regions::read_roles(&**e.store())
        .await
        .map(|(r, _)| r)
        .unwrap_or_default();
    let mut out = json!({
        "region": admin.region,
        "role": if admin.control.regions.is_some() {
            haven_cluster::regions::role_of(&roles, &admin.region)
        } else {
            "single"
        },
        "roles": roles,
        "node": e.config().node_id,
        "nodes_alive": members.iter().filter(|m| m.alive && !m.info.left).count(),
        "writable": e.store().check_writable().await.map_err(|e| e.to_string()).err(),
        "unreachable": admin
            .control
            .regions
            .as_ref()
            .map(|r| r.unreachable())
            .unwrap_or_default(),
        "peers": peers,
    });
    if let Some(r) = &admin.control.regions
        && let Ok(t) = r.takeovers().await
    {
        out["takeover"] = json!(t);
    }
    if q.digest {
        match haven_cluster::regions::state_digest_parts(&**e.store()).await {
            Ok(d) => out["digest"] = json!(d),
            Err(err) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading the state for its digest: {err}"),
                );
            }
        }
    }
    if let Some(part) = &q.items {
        match haven_cluster::regions::state_items(&**e.store(), part).await {
            Ok(items) => out["items"] = json!({ "part": part, "items": items }),
            Err(err) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading the state's items: {err}"),
                );
            }
        }
    }
    Json(out).into_response()
}

#[derive(serde::Deserialize)]
struct PromoteQuery {
    #[serde(default)]
    force: bool,
}

#[allow(clippy::result_large_err)]
fn multi_region(admin: &Admin) -> Result<&haven_cluster::regions::Regions, Response> {
    admin.control.regions.as_deref().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "this node runs one region: start it with --peer-regions (and a NATS store) for roles",
        )
    })
}

fn role_answer(
    r: Result<haven_cluster::regions::Roles, haven_cluster::regions::RoleError>,
) -> Response {
    use haven_cluster::regions::RoleError;
    match r {
        Ok(roles) => Json(roles).into_response(),
        Err(RoleError::Refused(why)) => error(StatusCode::CONFLICT, why),
        Err(RoleError::Store(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store cannot take the change now: {e}"),
        ),
    }
}

async fn region_promote(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<PromoteQuery>,
) -> Response {
    match multi_region(&admin) {
        Ok(r) => role_answer(r.promote(q.force).await),
        Err(e) => e,
    }
}

async fn region_demote(State(admin): State<Arc<Admin>>) -> Response {
    match multi_region(&admin) {
        Ok(r) => role_answer(r.demote().await),
        Err(e) => e,
    }
}

#[derive(serde::Deserialize)]
struct TakeoverQuery {
    region: String,
    #[serde(default)]
    confirm_dead: bool,
}

/// Takes over the running work of a lost region. Refused unless the operator confirms that
/// every process of that region is stopped, and, for a peer region, unless this node has
/// found it silent for the failure threshold. A region that is not a peer (one whose state a
/// backup brought here through `haven region bootstrap`) cannot be heard and does not write
/// here: the confirmation is enough.
async fn region_takeover(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<TakeoverQuery>,
) -> Response {
    if q.region == admin.region {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is this node's own region: its nodes take over each other's work as they die",
                q.region
            ),
        );
    }
    // A peer region may still be running its work; any other region's work here came from a
    // backup (`haven region bootstrap`) or from a region removed from --peer-regions, and no
    // process of that region writes to this region's store.
    let peer = admin
        .control
        .regions
        .as_deref()
        .filter(|r| r.peers().contains(&q.region));
    if let Some(regions) = peer
        && !regions.unreachable().contains(&q.region)
    {
        return error(
            StatusCode::CONFLICT,
            format!(
                "region {} is not silent here: it may be running its work itself; a takeover is only for a region that is gone",
                q.region
            ),
        );
    }
    if !q.confirm_dead {
        return error(
            StatusCode::CONFLICT,
            format!(
                "taking over region {}'s running work is safe only if every Haven process of it is stopped (a live one would go on writing that work too): stop them, or make sure they are gone, then confirm with --confirm-dead; when that region comes back, its nodes first apply this takeover",
                q.region
            ),
        );
    }
    // Work the lost region started under its region lease may be taken over by the majority
    // of regions at any moment: only a region that hears the majority may take it too.
    if peer.is_some()
        && let Some(lease) = &admin.engine.config().region_lease
        && !lease.holds()
    {
        match haven_cluster::takeover::claimable_of(&**admin.engine.store(), &q.region).await {
            Ok(0) => {}
            Ok(n) => {
                return error(
                    StatusCode::CONFLICT,
                    format!(
                        "{n} of region {}'s running requests were started under its region lease, and this region's own lease does not hold (it does not hear a majority of regions): the majority may be taking them over itself. Run the takeover from a region whose `haven region status` says `Region lease: holds`; nothing was taken over",
                        q.region
                    ),
                );
            }
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the store cannot take the takeover now: {e}"),
                );
            }
        }
    }
    match admin.engine.take_over_region(&q.region, false).await {
        Ok(taken) => Json(json!({ "region": q.region, "taken": taken })).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store cannot take the takeover now: {e}"),
        ),
    }
}

/// `/regionz`, for global load balancers and DNS health checks (no token: it says only the
/// region's name and role): 200 while this node is ready and its region is the active one
/// (or no region is active), has caught up with the other regions since it started and hears
/// a majority of all regions, 503 otherwise — a standby, or a region cut off from the
/// majority, still serves; it is just not preferred.
pub fn regionz_router(
    engine: haven_mcp::engine::Engine,
    region: String,
    regions: Option<Arc<haven_cluster::regions::Regions>>,
) -> Router {
    Router::new().route(
        "/regionz",
        get(move || {
            let engine = engine.clone();
            let region = region.clone();
            let regions = regions.clone();
            async move {
                let roles = haven_cluster::regions::read_roles(&**engine.store())
                    .await
                    .map(|(r, _)| r);
                let (preferred, role, active) = match &roles {
                    Ok(r) => (
                        r.active.is_none() || r.active.as_deref() == Some(region.as_str()),
                        if regions.is_none() {
                            "single"
                        } else {
                            haven_cluster::regions::role_of(r, &region)
                        },
                        r.active.clone(),
                    ),
                    Err(_) => (false, "unknown", None),
                };
                let caught_up = regions.as_ref().is_none_or(|r| r.caught_up());
                let unreachable = regions
                    .as_ref()
                    .map(|r| r.unreachable())
                    .unwrap_or_default();
                let majority = regions.as_ref().is_none_or(|r| r.hears_majority());
                let writable = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    engine.store().check_writable(),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                let ready = caught_up && majority && !engine.is_draining() && writable;
                let status = if preferred && ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    status,
                    Json(json!({
                        "region": region,
                        "role": role,
                        "active": active,
                        "ready": ready,
                        "caught_up": caught_up,
                        "hears_majority": majority,
                        "unreachable": unreachable,
                        "preferred": preferred && ready,
                    })),
                )
                    .into_response()
            }
        }),
    )
}

/// The main target's status, with the additional targets' under `also` (each with its own
/// lag); `null` without backup.
async fn backup_json(admin: &Admin) -> serde_json::Value {
    let Some((main, rest)) = admin.backup.split_first() else {
        return serde_json::Value::Null;
    };
    let mut v = serde_json::to_value(main.status().await).unwrap_or_default();
    if !rest.is_empty() {
        let mut also = Vec::new();
        for s in rest {
            also.push(serde_json::to_value(s.status().await).unwrap_or_default());
        }
        v["also"] = serde_json::Value::Array(also);
    }
    v
}

async fn backup_status(State(admin): State<Arc<Admin>>) -> Response {
    match shipper(&admin) {
        Ok(_) => Json(backup_json(&admin).await).into_response(),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct NowQuery {
    #[serde(default)]
    snapshot: bool,
}

/// A drill's result, as `haven drill run --deployment` records it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DrillRecord {
    scenario: String,
    ok: bool,
    finished_millis: u64,
    rto_seconds: Option<f64>,
    rpo_seconds: Option<f64>,
}

/// `POST /admin/v1/drills`: records a drill's result in the region's store, as the last drill
/// and, when it passed, the last successful one (what `/status`, `haven status` and
/// `haven_drill_last_success_timestamp_seconds` show).
async fn drill_record(State(admin): State<Arc<Admin>>, body: axum::body::Bytes) -> Response {
    use crate::status::{DRILL_KEY, DRILL_NS, DRILL_SUCCESS_KEY};
    let d: DrillRecord = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "send a JSON object {{\"scenario\": NAME, \"ok\": BOOL, \"finished_millis\": UNIX_MS, \"rto_seconds\": S, \"rpo_seconds\": S}}: {e}"
                ),
            );
        }
    };
    let name_ok = !d.scenario.is_empty()
        && d.scenario.len() <= 64
        && d.scenario
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !name_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "scenario: 1 to 64 characters of a-z, 0-9 and -",
        );
    }
    let now = admin.engine.store().clock().wall_millis();
    if d.finished_millis == 0 || d.finished_millis > now + 86_400_000 {
        return error(
            StatusCode::BAD_REQUEST,
            "finished_millis: the drill's end, Unix milliseconds, not in the future",
        );
    }
    for (what, v) in [
        ("rto_seconds", d.rto_seconds),
        ("rpo_seconds", d.rpo_seconds),
    ] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{what}: seconds, at least 0 (or null: never recovered)"),
            );
        }
    }
    let record = json!({
        "scenario": d.scenario,
        "ok": d.ok,
        "finished_millis": d.finished_millis,
        "rto_seconds": d.rto_seconds,
        "rpo_seconds": d.rpo_seconds,
    });
    let bytes = serde_json::to_vec(&record).expect("a JSON value serializes");
    let mut batch = haven_state::Batch::new().put(DRILL_NS, DRILL_KEY, bytes.clone());
    if d.ok {
        batch = batch.put(DRILL_NS, DRILL_SUCCESS_KEY, bytes);
    }
    match admin.engine.store().commit(batch).await {
        Ok(_) => (StatusCode::OK, Json(record)).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store cannot take the drill's record now: {e}"),
        ),
    }
}

async fn backup_now(State(admin): State<Arc<Admin>>, Query(q): Query<NowQuery>) -> Response {
    let s = match shipper(&admin) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let report = match s.ship_now(q.snapshot).await {
        Ok(report) => report,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("shipping failed: {e}"),
            );
        }
    };
    let mut v = serde_json::to_value(report).unwrap_or_default();
    // The additional targets too; one that fails says so without failing the main one.
    let mut also = Vec::new();
    for other in &admin.backup[1..] {
        also.push(match other.ship_now(q.snapshot).await {
            Ok(r) => serde_json::to_value(r).unwrap_or_default(),
            Err(e) => json!({ "error": format!("shipping failed: {e}") }),
        });
    }
    if !also.is_empty() {
        v["also"] = serde_json::Value::Array(also);
    }
    Json(v).into_response()
}

async fn backup_verify(State(admin): State<Arc<Admin>>) -> Response {
    let s = match shipper(&admin) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match s.verify_now().await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("verification failed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{bearer, describe_own_secrets, describe_wrapped};

    #[test]
    fn wrapped_secrets_are_counted_as_secrets_list_shows_them_and_havens_own_named() {
        assert_eq!(describe_wrapped(1, &[]), "1 secret");
        assert_eq!(describe_wrapped(0, &[]), "0 secrets");
        let own = vec![
            "system/request-state/k1".to_owned(),
            "system/admin-token/eu".to_owned(),
        ];
        assert_eq!(
            describe_wrapped(1, &own),
            "1 secret and 2 of Haven's own (a request-state signing key, the admin token of region eu)"
        );
        let two = vec![
            "system/request-state/k1".to_owned(),
            "system/request-state/k2".to_owned(),
        ];
        assert_eq!(describe_own_secrets(&two), "2 request-state signing keys");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer t0k", "bearer t0k", "BEARER t0k", "bEaReR   t0k"] {
            assert_eq!(bearer(v), Some("t0k"), "{v}");
        }
        for v in ["Basic t0k", "Bearer", "Bearert0k", "Token t0k"] {
            assert_ne!(bearer(v), Some("t0k"), "{v}");
        }
    }
}
