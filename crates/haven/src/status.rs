//! The status page (`/status`) and its data (`/admin/v1/overview`, which `haven status`
//! shows in the terminal): every region and node as this node sees them, their role and
//! health, availability over the last hour and day, latency percentiles and throughput (from
//! each node's heartbeat, which replicates to every region), replication lag, backup and
//! verification age, upstreams, the alerts a Prometheus has firing, Haven's own findings and
//! the last drill.
//!
//! The page is plain HTML and CSS: no script, no resource from elsewhere, a `refresh` meta
//! tag for the auto-refresh, a layout that folds to one column on a phone. On the admin
//! listener it takes the admin API's credentials: from a browser, through a login form that
//! keeps the token in an `HttpOnly`, `SameSite=Strict` cookie scoped to `/status`. With
//! `--metrics-listen` it is also served there without credentials, like `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use haven_telemetry::recent::{RecentSummary, availability};
use serde::Serialize;
use serde_json::Value;

use crate::admin::Admin;

/// Namespace of the drills' records, written by `haven drill`: under [`DRILL_KEY`] the last
/// drill, under [`DRILL_SUCCESS_KEY`] the last successful one, each a JSON object with
/// `scenario`, `ok`, `finished_millis` (Unix milliseconds), `rto_seconds` and `rpo_seconds`.
pub const DRILL_NS: &str = "drills";
/// See [`DRILL_NS`].
pub const DRILL_KEY: &str = "last";
/// See [`DRILL_NS`].
pub const DRILL_SUCCESS_KEY: &str = "last-success";

/// The drill record under `key` of [`DRILL_NS`], if any (and readable).
pub async fn last_drill(store: &dyn haven_state::Store, key: &str) -> Option<Value> {
    store
        .get(DRILL_NS, key)
        .await
        .ok()
        .flatten()
        .and_then(|r| serde_json::from_slice(r.value()).ok())
}
/// The cookie that carries the status page's credentials.
const COOKIE: &str = "haven_status";
/// Seconds between the page's refreshes.
const REFRESH_SECONDS: u32 = 5;
/// A peer region's replication lag that is worth a warning, and a critical finding.
const LAG_WARNING_SECONDS: f64 = 30.0;
const LAG_CRITICAL_SECONDS: f64 = 300.0;

/// What the status page shows.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// When this was put together, Unix milliseconds (the asked node's clock).
    pub generated_millis: u64,
    /// The asked node's region.
    pub region: String,
    /// The asked node.
    pub node: String,
    /// Its version.
    pub version: String,
    /// No critical finding and no critical alert firing.
    pub healthy: bool,
    /// This region first, then the others.
    pub regions: Vec<RegionView>,
    /// The backup targets of the asked node (the main one first).
    pub backup: Vec<BackupView>,
    /// The upstream MCP servers the region federates.
    pub upstreams: Vec<UpstreamView>,
    /// Haven's own findings, the most severe first.
    pub problems: Vec<Problem>,
    /// The alerts of the Prometheus given by `--alerts-url`.
    pub alerts: Alerts,
    /// The last drill's record, if any.
    pub drill: Option<Value>,
}

/// A region as the asked node sees it.
#[derive(Debug, Serialize)]
pub struct RegionView {
    /// Its name.
    pub name: String,
    /// Whether the asked node is in it.
    pub here: bool,
    /// `active`, `standby` or `single`.
    pub role: String,
    /// `up`, `degraded` (a node down, or the store not writable) or `unreachable`.
    pub state: &'static str,
    /// How its log reaches this region (`replicating`, `standby`, `unreachable`...); `None`
    /// for this region.
    pub link: Option<String>,
    /// Seconds since it was last heard here (other regions).
    pub silent_seconds: Option<f64>,
    /// Replication lag of its changes into this region, seconds and entries.
    pub lag_seconds: Option<f64>,
    /// See `lag_seconds`.
    pub lag_entries: Option<u64>,
    /// Nodes up, of those that have not left.
    pub nodes_up: usize,
    /// Its nodes.
    pub nodes: Vec<NodeView>,
    /// Over its nodes: availability over the last hour and day, requests per second over
    /// five minutes, the worst node's p99.
    pub availability_1h: Option<f64>,
    /// See `availability_1h`.
    pub availability_24h: Option<f64>,
    /// See `availability_1h`.
    pub rate_5m: f64,
    /// See `availability_1h`.
    pub p99_ms: Option<f64>,
}

/// A node as the asked node sees it.
#[derive(Debug, Serialize)]
pub struct NodeView {
    /// Its id.
    pub name: String,
    /// `up`, `draining`, `down`, `left` or `unknown` (its region is not heard).
    pub state: &'static str,
    /// Its version.
    pub version: String,
    /// Seconds since it started (by its clock).
    pub uptime_seconds: Option<u64>,
    /// Seconds since its heartbeat was last seen changing.
    pub silent_seconds: Option<f64>,
    /// Its recent requests, from its heartbeat.
    pub stats: Option<RecentSummary>,
    /// From `stats`.
    pub availability_1h: Option<f64>,
    /// From `stats`.
    pub availability_24h: Option<f64>,
    /// How far its clock is off the asked node's, in milliseconds (this region's nodes only).
    pub clock_offset_ms: Option<i64>,
}

/// A backup target.
#[derive(Debug, Serialize)]
pub struct BackupView {
    /// Where it ships.
    pub target: String,
    /// The shipper's state.
    pub state: String,
    /// Its last error, while it lasts.
    pub last_error: Option<String>,
    /// Log entries not shipped yet.
    pub lag_entries: u64,
    /// Seconds since the last segment, snapshot and verification.
    pub segment_age_seconds: Option<f64>,
    /// See `segment_age_seconds`.
    pub snapshot_age_seconds: Option<f64>,
    /// See `segment_age_seconds`.
    pub verification_age_seconds: Option<f64>,
    /// Whether the last verification found the backup whole.
    pub verification_ok: Option<bool>,
}

/// An upstream MCP server.
#[derive(Debug, Serialize)]
pub struct UpstreamView {
    /// Its name.
    pub name: String,
    /// `stdio`, `http`...
    pub transport: String,
    /// `connected`, `breaker-open`, `connecting`...
    pub state: String,
    /// Its last error, while it lasts.
    pub last_error: Option<String>,
}

/// One of Haven's own findings.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// `critical`, `warning` or `info`.
    pub severity: &'static str,
    /// What is wrong.
    pub what: String,
}

/// The alerts of the Prometheus given by `--alerts-url`.
#[derive(Debug, Default, Serialize)]
pub struct Alerts {
    /// The Prometheus asked (`None`: not configured).
    pub source: Option<String>,
    /// Why it could not be asked.
    pub error: Option<String>,
    /// Its Haven alerts, firing first.
    pub items: Vec<AlertView>,
}

/// An alert.
#[derive(Debug, Serialize)]
pub struct AlertView {
    /// `alertname`.
    pub name: String,
    /// `firing` or `pending`.
    pub state: String,
    /// Its `severity` label.
    pub severity: String,
    /// Its `summary` annotation.
    pub summary: String,
}

/// Configuration of the page.
#[derive(Clone, Debug, Default)]
pub struct StatusConfig {
    /// The Prometheus whose alerts are shown.
    pub alerts_url: Option<reqwest::Url>,
    /// Whether the admin listener is https (the login cookie is then `Secure`).
    pub secure_cookie: bool,
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "critical" => 0,
        "warning" => 1,
        _ => 2,
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn age(now: u64, at: Option<u64>) -> Option<f64> {
    at.map(|at| now.saturating_sub(at) as f64 / 1000.0)
}

fn node_view(
    info: &haven_cluster::membership::NodeInfo,
    state: &'static str,
    silent: Option<f64>,
) -> NodeView {
    NodeView {
        name: info.node.clone(),
        state,
        version: info.version.clone(),
        uptime_seconds: Some(info.beat_millis.saturating_sub(info.started_millis) / 1000),
        silent_seconds: silent,
        availability_1h: info.stats.as_ref().and_then(|s| s.availability_1h()),
        availability_24h: info.stats.as_ref().and_then(|s| s.availability_24h()),
        stats: info.stats.clone(),
        clock_offset_ms: None,
    }
}

/// Fills a region's totals from its nodes.
fn totals(r: &mut RegionView) {
    let stats = r.nodes.iter().filter_map(|n| n.stats.as_ref());
    let (mut q1, mut e1, mut q24, mut e24) = (0, 0, 0, 0);
    for s in stats.clone() {
        q1 += s.requests_1h;
        e1 += s.server_errors_1h;
        q24 += s.requests_24h;
        e24 += s.server_errors_24h;
    }
    r.availability_1h = availability(q1, e1);
    r.availability_24h = availability(q24, e24);
    // Only the nodes up serve traffic now.
    r.rate_5m = r
        .nodes
        .iter()
        .filter(|n| n.state == "up" || n.state == "draining")
        .filter_map(|n| n.stats.as_ref())
        .map(|s| s.rate_5m)
        .sum();
    r.p99_ms = stats.filter_map(|s| s.p99_ms).reduce(f64::max);
    r.nodes_up = r
        .nodes
        .iter()
        .filter(|n| n.state == "up" || n.state == "draining")
        .count();
}

/// Puts the overview together.
pub async fn overview(admin: &Admin) -> Overview {
    let e = &admin.engine;
    let now = now_millis();
    let store = e.store();
    let mut problems = Vec::new();
    let roles = haven_cluster::regions::read_roles(&**store)
        .await
        .map(|(r, _)| r)
        .unwrap_or_default();
    let multi = admin.control.regions.is_some();
    let role_of = |name: &str| {
        if multi {
            haven_cluster::regions::role_of(&roles, name).to_owned()
        } else {
            "single".to_owned()
        }
    };

    // This region, from the node's membership.
    let mut here = RegionView {
        name: admin.region.clone(),
        here: true,
        role: role_of(&admin.region),
        state: "up",
        link: None,
        silent_seconds: None,
        lag_seconds: None,
        lag_entries: None,
        nodes_up: 0,
        nodes: Vec::new(),
        availability_1h: None,
        availability_24h: None,
        rate_5m: 0.0,
        p99_ms: None,
    };
    let mut members = e.members();
    members.sort_by(|a, b| a.info.node.cmp(&b.info.node));
    for m in &members {
        let state = if m.info.left {
            "left"
        } else if !m.alive {
            "down"
        } else if m.info.draining {
            "draining"
        } else {
            "up"
        };
        let silent = m.silent_millis as f64 / 1000.0;
        if state == "down" {
            problems.push(Problem {
                severity: "warning",
                what: format!(
                    "node {} of region {} is down: no heartbeat for {:.0} s",
                    m.info.node, admin.region, silent
                ),
            });
        }
        if m.clock_skewed {
            problems.push(Problem {
                severity: "warning",
                what: format!(
                    "node {}'s clock is {} ms off this node's: fix time synchronisation (NTP)",
                    m.info.node,
                    m.clock_offset_millis.unwrap_or_default()
                ),
            });
        }
        let mut view = node_view(&m.info, state, Some(silent));
        view.clock_offset_ms = m.clock_offset_millis;
        here.nodes.push(view);
    }
    if let Err(err) = store.check_writable().await {
        here.state = "degraded";
        problems.push(Problem {
            severity: "critical",
            what: format!("region {}'s store takes no writes: {err}", admin.region),
        });
    }
    let d = store.describe().await;
    if d["backend"] == "nats" {
        if d["connection"].as_str() != Some("Connected") {
            problems.push(Problem {
                severity: "critical",
                what: format!(
                    "node {} is not connected to NATS ({})",
                    e.config().node_id,
                    d["connection"].as_str().unwrap_or("unknown")
                ),
            });
        }
        let sync = crate::nats_sync::found();
        for server in sync["servers"].as_array().into_iter().flatten() {
            if server["sync_always"] == false {
                problems.push(Problem {
                    severity: "warning",
                    what: format!(
                        "NATS server {} does not sync every write to disk (set jetstream {{ sync_interval: always }}): acknowledged writes can be lost if the servers crash together",
                        server["server"].as_str().unwrap_or("?")
                    ),
                });
            }
        }
        if d["leader"].as_str().is_none_or(str::is_empty) {
            problems.push(Problem {
                severity: "critical",
                what: format!("region {}'s stream has no leader (no quorum)", admin.region),
            });
        }
    }
    if e.is_draining() {
        problems.push(Problem {
            severity: "info",
            what: format!("node {} is draining", e.config().node_id),
        });
    }
    totals(&mut here);
    if here.nodes.iter().any(|n| n.state == "down") {
        here.state = "degraded";
    }
    let mut regions = vec![here];

    // The other regions: their links here, and their nodes' replicated heartbeats.
    if let Some(r) = &admin.control.regions {
        let mut beats: BTreeMap<String, Vec<haven_cluster::membership::NodeInfo>> = BTreeMap::new();
        if let Ok(records) = store
            .scan_all(haven_cluster::membership::NODES_NS, "")
            .await
        {
            for rec in records {
                if let Ok(info) =
                    serde_json::from_slice::<haven_cluster::membership::NodeInfo>(rec.value())
                    && info.region != admin.region
                {
                    beats.entry(info.region.clone()).or_default().push(info);
                }
            }
        }
        for p in r.status().await {
            let mut infos = beats.remove(&p.name).unwrap_or_default();
            infos.sort_by(|a, b| a.node.cmp(&b.node));
            let newest = infos.iter().map(|i| i.beat_millis).max().unwrap_or(0);
            let mut view = RegionView {
                name: p.name.clone(),
                here: false,
                role: role_of(&p.name),
                state: if p.silent { "unreachable" } else { "up" },
                link: Some(p.link.clone()),
                silent_seconds: p.silent_seconds,
                lag_seconds: p.lag_seconds,
                lag_entries: p.behind_entries,
                nodes_up: 0,
                nodes: Vec::new(),
                availability_1h: None,
                availability_24h: None,
                rate_5m: 0.0,
                p99_ms: None,
            };
            for info in &infos {
                // Judged by that region's own clock: a node whose heartbeat is more than
                // its time-to-live older than the region's newest one is down.
                let behind = newest.saturating_sub(info.beat_millis);
                let state = if info.left {
                    "left"
                } else if p.silent {
                    "unknown"
                } else if behind > info.ttl_millis.max(5_000) {
                    "down"
                } else if info.draining {
                    "draining"
                } else {
                    "up"
                };
                let silent = p.silent_seconds.map(|s| s + behind as f64 / 1000.0);
                view.nodes.push(node_view(info, state, silent));
            }
            totals(&mut view);
            if view.state == "up" && view.nodes.iter().any(|n| n.state == "down") {
                view.state = "degraded";
            }
            if p.silent {
                problems.push(Problem {
                    severity: "critical",
                    what: format!(
                        "region {} is unreachable from region {}: not heard for {:.0} s",
                        p.name,
                        admin.region,
                        p.silent_seconds.unwrap_or_default()
                    ),
                });
            } else if let Some(lag) = p.lag_seconds
                && lag > LAG_WARNING_SECONDS
            {
                problems.push(Problem {
                    severity: if lag > LAG_CRITICAL_SECONDS {
                        "critical"
                    } else {
                        "warning"
                    },
                    what: format!(
                        "replication from region {} into {} is {lag:.0} s behind",
                        p.name, admin.region
                    ),
                });
            }
            regions.push(view);
        }
    }

    // Backups.
    let mut backup = Vec::new();
    for s in &admin.backup {
        let st = s.status().await;
        let v = BackupView {
            target: st.target.clone(),
            state: st.state.clone(),
            last_error: st.last_error.clone(),
            lag_entries: st.lag_entries,
            segment_age_seconds: age(now, st.last_ship_millis.or(st.last_segment_millis)),
            snapshot_age_seconds: age(now, st.last_snapshot_millis),
            verification_age_seconds: age(now, st.last_verification.as_ref().map(|v| v.at_millis)),
            verification_ok: st.last_verification.as_ref().map(|v| v.ok),
        };
        if let Some(err) = &v.last_error {
            problems.push(Problem {
                severity: "warning",
                what: format!("backup to {} fails: {err}", v.target),
            });
        }
        if v.verification_ok == Some(false) {
            problems.push(Problem {
                severity: "critical",
                what: format!("the last verification of the backup in {} failed", v.target),
            });
        }
        if v.snapshot_age_seconds.is_some_and(|a| a > 2.0 * 86_400.0) {
            problems.push(Problem {
                severity: "warning",
                what: format!("the newest snapshot in {} is over two days old", v.target),
            });
        }
        backup.push(v);
    }

    // Upstreams.
    let mut upstreams = Vec::new();
    for u in admin.control.upstreams.status() {
        let state = serde_json::to_value(u.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        if state != "connected" {
            problems.push(Problem {
                severity: "warning",
                what: format!(
                    "upstream {} is {state}{}",
                    u.name,
                    u.last_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
            });
        }
        upstreams.push(UpstreamView {
            name: u.name.clone(),
            transport: u.transport.to_owned(),
            state,
            last_error: u.last_error.clone(),
        });
    }

    if admin.control.policy.current().unreadable() > 0 {
        problems.push(Problem {
            severity: "critical",
            what: "an authorization rule cannot be read: every call is refused until it is fixed"
                .into(),
        });
    }
    let dropped = admin.control.audit.dropped();
    if dropped > 0 {
        problems.push(Problem {
            severity: "warning",
            what: format!("{dropped} audit records were dropped (the audit writer fell behind)"),
        });
    }
    problems.sort_by_key(|p| severity_rank(p.severity));

    let alerts = alerts(admin.status.alerts_url.as_ref()).await;
    let drill = last_drill(&**store, DRILL_KEY).await;
    let healthy = !problems.iter().any(|p| p.severity == "critical")
        && !alerts
            .items
            .iter()
            .any(|a| a.state == "firing" && a.severity == "critical");
    Overview {
        generated_millis: now,
        region: admin.region.clone(),
        node: e.config().node_id.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        healthy,
        regions,
        backup,
        upstreams,
        problems,
        alerts,
        drill,
    }
}

/// The Haven alerts (firing and pending) of the Prometheus at `url`, asked with a 2 s limit.
async fn alerts(url: Option<&reqwest::Url>) -> Alerts {
    let Some(base) = url else {
        return Alerts::default();
    };
    let mut out = Alerts {
        source: Some(base.to_string()),
        ..Alerts::default()
    };
    let got: Result<Value, String> = async {
        let tls = haven_state::tls::client_config(None, None).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| e.to_string())?;
        let url = base
            .join("api/v1/alerts")
            .map_err(|e| format!("{base}: {e}"))?;
        let r = client.get(url).send().await.map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("it answered {}", r.status()));
        }
        r.json().await.map_err(|e| e.to_string())
    }
    .await;
    match got {
        Err(e) => out.error = Some(e),
        Ok(v) => {
            let s = |a: &Value, k: &str| {
                a.pointer(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            for a in v["data"]["alerts"].as_array().into_iter().flatten() {
                let name = s(a, "/labels/alertname");
                if !name.starts_with("Haven") {
                    continue;
                }
                out.items.push(AlertView {
                    name,
                    state: s(a, "/state"),
                    severity: s(a, "/labels/severity"),
                    summary: s(a, "/annotations/summary"),
                });
            }
            out.items.sort_by_key(|a| {
                (
                    a.state != "firing",
                    severity_rank(&a.severity),
                    a.name.clone(),
                )
            });
        }
    }
    out
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v >= 0.99995 => "100 %".into(),
        Some(v) => format!("{:.2} %", v * 100.0),
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v < 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.0} ms"),
    }
}

/// A duration in seconds, in the largest unit that fits.
pub fn human_secs(v: Option<f64>) -> String {
    let Some(s) = v else { return "—".into() };
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.0} h", s / 3600.0)
    } else {
        format!("{:.0} d", s / 86_400.0)
    }
}

fn availability_class(v: Option<f64>) -> &'static str {
    match v {
        Some(v) if v < 0.99 => "bad",
        _ => "",
    }
}

const STYLE: &str = "
:root{color-scheme:light dark;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--mute:#6e7781;--line:#d0d7de}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;padding:12px;max-width:1100px;margin-inline:auto}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}
.meta{color:var(--mute);font-size:.9em}
.banner{padding:.6em .8em;border-radius:6px;font-weight:600;margin:.6em 0}
.banner.ok{background:#dafbe1;color:var(--ok)}.banner.bad{background:#ffebe9;color:var(--bad)}
.regions{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px}
.card h2{margin-top:0}
.badge{display:inline-block;padding:0 .45em;border-radius:1em;font-size:.8em;font-weight:600;border:1px solid currentColor;margin-left:.3em}
.up,.ok{color:var(--ok)}.degraded,.draining,.warning,.pending,.warn{color:var(--warn)}
.down,.unreachable,.critical,.firing,.bad{color:var(--bad)}.left,.unknown,.info{color:var(--mute)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{text-align:left;padding:.25em .4em;border-bottom:1px solid var(--line);white-space:nowrap}
th{font-weight:600;color:var(--mute)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em .8em;margin:.4em 0}dt{color:var(--mute)}dd{margin:0}
ul.findings{padding-left:1.2em;margin:.3em 0}
footer{margin-top:2em;color:var(--mute);font-size:.85em}
";

/// The page.
pub fn render(o: &Overview) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_millis(o.generated_millis),
    );
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
<title>Haven status: {region}</title><style>{STYLE}</style></head><body>\
<header><h1>Haven status</h1><p class=\"meta\">Seen from node <b>{node}</b> of region <b>{region}</b> \
(Haven {version}) at {when}; refreshes every {REFRESH_SECONDS} s.</p>",
        region = esc(&o.region),
        node = esc(&o.node),
        version = esc(&o.version),
    );
    let critical = o
        .problems
        .iter()
        .filter(|p| p.severity == "critical")
        .count()
        + o.alerts
            .items
            .iter()
            .filter(|a| a.state == "firing" && a.severity == "critical")
            .count();
    if o.healthy {
        let _ = write!(
            h,
            "<p class=\"banner ok\" id=\"overall\" data-healthy=\"true\">Healthy: no critical finding{}</p>",
            if o.problems.is_empty() {
                ""
            } else {
                " (see the findings below)"
            }
        );
    } else {
        let _ = write!(
            h,
            "<p class=\"banner bad\" id=\"overall\" data-healthy=\"false\">{critical} critical finding{}</p>",
            if critical == 1 { "" } else { "s" }
        );
    }
    h.push_str("</header><main>");

    // Findings and alerts.
    h.push_str("<section id=\"findings\"><h2>Findings</h2>");
    if o.problems.is_empty() {
        h.push_str("<p class=\"ok\">None.</p>");
    } else {
        h.push_str("<ul class=\"findings\">");
        for p in &o.problems {
            let _ = write!(
                h,
                "<li class=\"{s}\" data-severity=\"{s}\"><b>{s}</b>: {w}</li>",
                s = p.severity,
                w = esc(&p.what)
            );
        }
        h.push_str("</ul>");
    }
    h.push_str("</section><section id=\"alerts\"><h2>Alerts</h2>");
    match (&o.alerts.source, &o.alerts.error) {
        (None, _) => h.push_str(
            "<p class=\"meta\">No Prometheus given (<code>--alerts-url</code>): only Haven's own findings are shown.</p>",
        ),
        (Some(src), Some(err)) => {
            let _ = write!(
                h,
                "<p class=\"warn\">Could not ask {} for its alerts: {}</p>",
                esc(src),
                esc(err)
            );
        }
        (Some(src), None) if o.alerts.items.is_empty() => {
            let _ = write!(
                h,
                "<p class=\"ok\">None firing or pending in {}.</p>",
                esc(src)
            );
        }
        (Some(_), None) => {
            h.push_str("<ul class=\"findings\">");
            for a in &o.alerts.items {
                let _ = write!(
                    h,
                    "<li class=\"{st}\" data-alert=\"{n}\" data-state=\"{st}\"><b>{n}</b> <span class=\"badge {sev}\">{sev}</span> <span class=\"badge {st}\">{st}</span> {sum}</li>",
                    n = esc(&a.name),
                    st = esc(&a.state),
                    sev = esc(&a.severity),
                    sum = esc(&a.summary)
                );
            }
            h.push_str("</ul>");
        }
    }
    h.push_str("</section>");

    // Regions and nodes.
    h.push_str("<section id=\"regions\"><h2>Regions</h2><div class=\"regions\">");
    for r in &o.regions {
        let _ = write!(
            h,
            "<article class=\"card\" data-region=\"{n}\" data-state=\"{st}\"><h2>{n}{here} <span class=\"badge {st}\">{st}</span> <span class=\"badge info\">{role}</span></h2><dl>\
<dt>Nodes up</dt><dd>{up} of {all}</dd>\
<dt>Availability</dt><dd><span class=\"{c1}\">{a1}</span> (1 h) · <span class=\"{c24}\">{a24}</span> (24 h)</dd>\
<dt>Throughput</dt><dd>{rate:.1} req/s (5 min)</dd><dt>Latency p99</dt><dd>{p99}</dd>",
            n = esc(&r.name),
            here = if r.here { " (here)" } else { "" },
            st = r.state,
            role = esc(&r.role),
            up = r.nodes_up,
            all = r.nodes.iter().filter(|n| n.state != "left").count(),
            c1 = availability_class(r.availability_1h),
            a1 = pct(r.availability_1h),
            c24 = availability_class(r.availability_24h),
            a24 = pct(r.availability_24h),
            rate = r.rate_5m,
            p99 = ms(r.p99_ms),
        );
        if let Some(link) = &r.link {
            let _ = write!(
                h,
                "<dt>Replication here</dt><dd data-lag=\"{}\">{} behind, {} entries ({})</dd><dt>Last heard</dt><dd>{} ago</dd>",
                r.lag_seconds.map(|l| format!("{l:.3}")).unwrap_or_default(),
                human_secs(r.lag_seconds),
                r.lag_entries.map_or("?".into(), |e| e.to_string()),
                esc(link),
                human_secs(r.silent_seconds),
            );
        }
        h.push_str("</dl><div class=\"scroll\"><table><thead><tr><th>Node</th><th>State</th><th>Avail. 1 h</th><th>24 h</th><th>p50</th><th>p95</th><th>p99</th><th>req/s</th><th>Heard</th><th>Up for</th><th>Version</th></tr></thead><tbody>");
        for n in &r.nodes {
            let s = n.stats.as_ref();
            let _ = write!(
                h,
                "<tr data-node=\"{name}\" data-state=\"{st}\"><td>{name}</td><td class=\"{st}\">{st}</td><td class=\"{c1}\">{a1}</td><td class=\"{c24}\">{a24}</td><td>{p50}</td><td>{p95}</td><td>{p99}</td><td>{rate}</td><td>{heard}</td><td>{up}</td><td>{v}</td></tr>",
                name = esc(&n.name),
                st = n.state,
                c1 = availability_class(n.availability_1h),
                a1 = pct(n.availability_1h),
                c24 = availability_class(n.availability_24h),
                a24 = pct(n.availability_24h),
                p50 = ms(s.and_then(|s| s.p50_ms)),
                p95 = ms(s.and_then(|s| s.p95_ms)),
                p99 = ms(s.and_then(|s| s.p99_ms)),
                rate = s.map_or("—".into(), |s| format!("{:.1}", s.rate_5m)),
                heard = n
                    .silent_seconds
                    .map_or("—".into(), |s| format!("{} ago", human_secs(Some(s)))),
                up = human_secs(n.uptime_seconds.map(|u| u as f64)),
                v = esc(&n.version),
            );
        }
        h.push_str("</tbody></table></div></article>");
    }
    h.push_str("</div></section>");

    // Backup.
    h.push_str("<section id=\"backup\"><h2>Backup</h2>");
    if o.backup.is_empty() {
        h.push_str("<p class=\"meta\">This node ships no backup (<code>--backup-url</code>).</p>");
    } else {
        h.push_str("<div class=\"scroll\"><table><thead><tr><th>Target</th><th>State</th><th>Behind</th><th>Last segment</th><th>Last snapshot</th><th>Last verification</th></tr></thead><tbody>");
        for b in &o.backup {
            let ver = match b.verification_ok {
                None => "never".to_owned(),
                Some(ok) => format!(
                    "<span class=\"{}\">{}</span>, {} ago",
                    if ok { "ok" } else { "bad" },
                    if ok { "whole" } else { "FAILED" },
                    human_secs(b.verification_age_seconds)
                ),
            };
            let _ = write!(
                h,
                "<tr data-backup=\"{t}\"><td>{t}</td><td class=\"{c}\">{s}{err}</td><td>{lag} entries</td><td>{seg} ago</td><td>{snap} ago</td><td>{ver}</td></tr>",
                t = esc(&b.target),
                c = if b.last_error.is_some() { "warn" } else { "ok" },
                s = esc(&b.state),
                err = b
                    .last_error
                    .as_deref()
                    .map(|e| format!(": {}", esc(e)))
                    .unwrap_or_default(),
                lag = b.lag_entries,
                seg = human_secs(b.segment_age_seconds),
                snap = human_secs(b.snapshot_age_seconds),
            );
        }
        h.push_str("</tbody></table></div>");
    }
    h.push_str("</section>");

    // Upstreams.
    h.push_str("<section id=\"upstreams\"><h2>Upstreams</h2>");
    if o.upstreams.is_empty() {
        h.push_str("<p class=\"meta\">No upstream MCP server is registered.</p>");
    } else {
        h.push_str("<div class=\"scroll\"><table><thead><tr><th>Upstream</th><th>Transport</th><th>State</th><th>Last error</th></tr></thead><tbody>");
        for u in &o.upstreams {
            let _ = write!(
                h,
                "<tr data-upstream=\"{n}\"><td>{n}</td><td>{t}</td><td class=\"{c}\">{s}</td><td>{e}</td></tr>",
                n = esc(&u.name),
                t = esc(&u.transport),
                c = if u.state == "connected" { "ok" } else { "warn" },
                s = esc(&u.state),
                e = esc(u.last_error.as_deref().unwrap_or("")),
            );
        }
        h.push_str("</tbody></table></div>");
    }
    h.push_str("</section>");

    // Drill.
    h.push_str("<section id=\"drill\"><h2>Last drill</h2>");
    match &o.drill {
        None => h.push_str("<p class=\"meta\">No drill on record.</p>"),
        Some(d) => {
            let _ = write!(
                h,
                "<p>{} {}: RTO {}, RPO {}.</p>",
                esc(d["scenario"].as_str().unwrap_or("?")),
                if d["ok"] == true {
                    "<span class=\"ok\">passed</span>"
                } else {
                    "<span class=\"bad\">failed</span>"
                },
                human_secs(d["rto_seconds"].as_f64()),
                human_secs(d["rpo_seconds"].as_f64()),
            );
        }
    }
    h.push_str(
        "</section></main><footer>The same as JSON: <code>/admin/v1/overview</code>; in a terminal: <code>haven status</code>.</footer></body></html>",
    );
    h
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /status`.
pub async fn page(State(admin): State<Arc<Admin>>) -> Response {
    let o = overview(&admin).await;
    no_store(Html(render(&o)).into_response())
}

/// `GET /admin/v1/overview`.
pub async fn json(State(admin): State<Arc<Admin>>) -> Response {
    no_store(axum::Json(overview(&admin).await).into_response())
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let msg = message
        .map(|m| format!("<p class=\"bad\" id=\"refused\">{}</p>", esc(m)))
        .unwrap_or_default();
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>Haven status: sign in</title>\
<style>{STYLE} input{{font:inherit;width:100%;padding:.4em;margin:.3em 0}} button{{font:inherit;padding:.4em 1em}}</style></head><body>\
<h1>Haven status</h1>{msg}<form method=\"post\" action=\"/status/login\">\
<label for=\"token\">The node's admin token, or an access token or API key with a haven:viewer role or higher</label>\
<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Show the status</button></form>\
<p class=\"meta\">It is kept in a cookie for this page only, until the browser closes.</p></body></html>"
    );
    no_store((status, Html(body)).into_response())
}

/// Turns a `/status` request's cookie into its credentials, and a refusal of them into the
/// login form.
pub async fn cookie_credentials(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().path() != "/status" {
        return next.run(request).await;
    }
    if !request.headers().contains_key(header::AUTHORIZATION)
        && let Some(token) = cookie(request.headers())
        && let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}"))
    {
        request.headers_mut().insert(header::AUTHORIZATION, v);
    }
    let r = next.run(request).await;
    match r.status() {
        StatusCode::UNAUTHORIZED => login_page(StatusCode::UNAUTHORIZED, None),
        StatusCode::FORBIDDEN => login_page(
            StatusCode::FORBIDDEN,
            Some("These credentials have no haven:viewer role."),
        ),
        _ => r,
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /status/login`: checks the token as the admin API would for `GET /status`, and
/// keeps it in the page's cookie.
pub async fn login(State(admin): State<Arc<Admin>>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim();
    let cookie_safe = !token.is_empty()
        && token.len() <= 4096
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\'));
    if !cookie_safe {
        return login_page(
            StatusCode::UNAUTHORIZED,
            Some("That is not a token: paste the admin token, an access token or an API key."),
        );
    }
    if let Err(why) = crate::admin::check_viewer(&admin, token).await {
        crate::admin_audit::auth_failure(&admin);
        return login_page(StatusCode::UNAUTHORIZED, Some(&why));
    }
    let secure = if admin.status.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/status")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/status; HttpOnly; SameSite=Strict{secure}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    no_store(r)
}

/// `POST /status/logout`: forgets the cookie.
pub async fn logout() -> Response {
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/status")]).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "haven_status=; Path=/status; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

/// The overview (`/admin/v1/overview`'s JSON) as `haven status` prints it: every region and
/// its nodes, then the findings, alerts, backup, upstreams and the last drill.
pub fn render_text(o: &Value) -> String {
    let mut t = String::new();
    let f = |v: &Value| v.as_f64();
    let _ = writeln!(
        t,
        "{}",
        if o["healthy"] == true {
            "Healthy: no critical finding".to_owned()
        } else {
            "NOT HEALTHY: see the critical findings below".to_owned()
        }
    );
    for r in o["regions"].as_array().into_iter().flatten() {
        let _ = writeln!(t);
        let _ = write!(
            t,
            "Region {}{} — {} ({}), nodes up {}; availability {} (1 h), {} (24 h); {:.1} req/s; p99 {}",
            r["name"].as_str().unwrap_or("?"),
            if r["here"] == true { " (here)" } else { "" },
            r["state"].as_str().unwrap_or("?"),
            r["role"].as_str().unwrap_or("?"),
            r["nodes_up"],
            pct(f(&r["availability_1h"])),
            pct(f(&r["availability_24h"])),
            f(&r["rate_5m"]).unwrap_or_default(),
            ms(f(&r["p99_ms"])),
        );
        if let Some(link) = r["link"].as_str() {
            let _ = write!(
                t,
                "; replication here {} behind, {} entries ({link})",
                human_secs(f(&r["lag_seconds"])),
                r["lag_entries"]
                    .as_u64()
                    .map_or("?".into(), |e| e.to_string()),
            );
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "  {:<20} {:<9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8} {:>9}  VERSION",
            "NODE",
            "STATE",
            "AVAIL 1H",
            "AVAIL 24H",
            "P50",
            "P95",
            "P99",
            "REQ/S",
            "HEARD",
            "UP FOR",
            "SKEW"
        );
        for n in r["nodes"].as_array().into_iter().flatten() {
            let s = &n["stats"];
            let _ = writeln!(
                t,
                "  {:<20} {:<9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8} {:>9}  {}",
                n["name"].as_str().unwrap_or("?"),
                n["state"].as_str().unwrap_or("?"),
                pct(f(&n["availability_1h"])),
                pct(f(&n["availability_24h"])),
                ms(f(&s["p50_ms"])),
                ms(f(&s["p95_ms"])),
                ms(f(&s["p99_ms"])),
                f(&s["rate_5m"]).map_or("—".into(), |r| format!("{r:.1}")),
                human_secs(f(&n["silent_seconds"])),
                human_secs(f(&n["uptime_seconds"])),
                n["clock_offset_ms"]
                    .as_i64()
                    .map_or("—".into(), |o| format!("{o:+} ms")),
                n["version"].as_str().unwrap_or("?"),
            );
        }
    }
    let _ = writeln!(t);
    let problems = o["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        let _ = writeln!(t, "Findings: none");
    } else {
        let _ = writeln!(t, "Findings:");
        for p in &problems {
            let _ = writeln!(
                t,
                "  {:<8} {}",
                p["severity"].as_str().unwrap_or("?"),
                p["what"].as_str().unwrap_or("?")
            );
        }
    }
    let a = &o["alerts"];
    match (a["source"].as_str(), a["error"].as_str()) {
        (None, _) => {
            let _ = writeln!(t, "Alerts: no Prometheus given (--alerts-url)");
        }
        (Some(src), Some(err)) => {
            let _ = writeln!(t, "Alerts: could not ask {src}: {err}");
        }
        (Some(src), None) => {
            let items = a["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                let _ = writeln!(t, "Alerts: none firing or pending in {src}");
            } else {
                let _ = writeln!(t, "Alerts ({src}):");
                for i in &items {
                    let _ = writeln!(
                        t,
                        "  {:<8} {:<8} {:<32} {}",
                        i["state"].as_str().unwrap_or("?"),
                        i["severity"].as_str().unwrap_or("?"),
                        i["name"].as_str().unwrap_or("?"),
                        i["summary"].as_str().unwrap_or(""),
                    );
                }
            }
        }
    }
    for b in o["backup"].as_array().into_iter().flatten() {
        let verification = match b["verification_ok"].as_bool() {
            None => "never verified".to_owned(),
            Some(ok) => format!(
                "verified {} ago: {}",
                human_secs(f(&b["verification_age_seconds"])),
                if ok { "whole" } else { "FAILED" }
            ),
        };
        let _ = writeln!(
            t,
            "Backup to {}: {}, {} entries behind; last segment {} ago, snapshot {} ago, {verification}",
            b["target"].as_str().unwrap_or("?"),
            b["state"].as_str().unwrap_or("?"),
            b["lag_entries"],
            human_secs(f(&b["segment_age_seconds"])),
            human_secs(f(&b["snapshot_age_seconds"])),
        );
    }
    for u in o["upstreams"].as_array().into_iter().flatten() {
        let _ = writeln!(
            t,
            "Upstream {} ({}): {}{}",
            u["name"].as_str().unwrap_or("?"),
            u["transport"].as_str().unwrap_or("?"),
            u["state"].as_str().unwrap_or("?"),
            u["last_error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let d = &o["drill"];
    if d.is_null() {
        let _ = writeln!(t, "Last drill: none on record");
    } else {
        let _ = writeln!(
            t,
            "Last drill: {} {}, RTO {}, RPO {}",
            d["scenario"].as_str().unwrap_or("?"),
            if d["ok"] == true { "passed" } else { "FAILED" },
            human_secs(f(&d["rto_seconds"])),
            human_secs(f(&d["rpo_seconds"])),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Overview {
        let node = |name: &str, state: &'static str| NodeView {
            name: name.into(),
            state,
            version: "0.1.0".into(),
            uptime_seconds: Some(3600),
            silent_seconds: Some(0.4),
            stats: Some(RecentSummary {
                requests_1h: 1000,
                server_errors_1h: 20,
                requests_24h: 1000,
                server_errors_24h: 20,
                rate_5m: 2.0,
                p50_ms: Some(1.5),
                p95_ms: Some(9.0),
                p99_ms: Some(40.0),
            }),
            availability_1h: Some(0.98),
            availability_24h: Some(0.98),
            clock_offset_ms: Some(-3),
        };
        let mut r = RegionView {
            name: "eu<1>".into(),
            here: true,
            role: "active".into(),
            state: "degraded",
            link: None,
            silent_seconds: None,
            lag_seconds: None,
            lag_entries: None,
            nodes_up: 0,
            nodes: vec![node("a", "up"), node("b", "down")],
            availability_1h: None,
            availability_24h: None,
            rate_5m: 0.0,
            p99_ms: None,
        };
        totals(&mut r);
        Overview {
            generated_millis: 1_800_000_000_000,
            region: "eu<1>".into(),
            node: "a".into(),
            version: "0.1.0".into(),
            healthy: false,
            regions: vec![r],
            backup: vec![],
            upstreams: vec![],
            problems: vec![Problem {
                severity: "critical",
                what: "a <script>".into(),
            }],
            alerts: Alerts::default(),
            drill: None,
        }
    }

    #[test]
    fn totals_add_the_nodes_and_count_only_the_live_ones_traffic() {
        let o = sample();
        let r = &o.regions[0];
        assert_eq!(r.nodes_up, 1);
        assert_eq!(r.availability_1h, Some(0.98));
        assert_eq!(r.rate_5m, 2.0);
        assert_eq!(r.p99_ms, Some(40.0));
    }

    #[test]
    fn the_page_escapes_what_it_shows_and_needs_no_script() {
        let h = render(&sample());
        assert!(h.contains("eu&lt;1&gt;"), "{h}");
        assert!(h.contains("a &lt;script&gt;"));
        assert!(!h.contains("<script"));
        assert!(h.contains("data-node=\"b\" data-state=\"down\""));
        assert!(h.contains("<meta http-equiv=\"refresh\""));
        assert!(h.contains("98.00 %"));
        assert!(!h.contains("http://") && !h.contains("https://"));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; haven_status=tok.en-1; c=d"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("tok.en-1"));
        assert_eq!(cookie(&HeaderMap::new()), None);
    }
}
