//! `/metrics`: the process's registry (`haven_telemetry`), with the gauges that describe the
//! node's state read fresh at every scrape (sessions, the store, regions, backups, upstreams,
//! settings, the process), served as OpenMetrics to a scraper that asks for it (Prometheus
//! does) and as the Prometheus text format otherwise. Store commits are timed by
//! [`MeteredStore`], which wraps the node's store.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use haven_state::{Batch, Commit, Store, StoreError, StoreResult};
use haven_telemetry::{KindLabel, PeerLabel, UpstreamLabel};

use crate::admin::Admin;

/// A store whose commits are timed (`haven_store_commit_duration_seconds`) and whose failed
/// commits are counted by kind (`haven_store_commit_errors_total`).
pub struct MeteredStore {
    inner: Arc<dyn Store>,
}

impl MeteredStore {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(MeteredStore { inner })
    }
}

haven_state::wrap_store!(MeteredStore, inner, {
    async fn commit(&self, batch: Batch) -> StoreResult<Commit> {
        let started = Instant::now();
        // A commit has a span of its own only inside a sampled trace, made directly with
        // OpenTelemetry: a legacy request makes several commits, and the spans of the
        // unsampled majority, or spans carried through `tracing`'s layers, cost a large share
        // of its CPU with tracing on.
        let mut span =
            haven_telemetry::trace::inner_span(&tracing::Span::current(), "store.commit");
        let r = match &span {
            // The writer's trace goes with the batch (beside it, never in it), so that a
            // region that replicates it can link back.
            Some(s) => {
                haven_state::trace::with_traceparent(
                    Some(s.traceparent().to_owned()),
                    self.inner.commit(batch),
                )
                .await
            }
            None => self.inner.commit(batch).await,
        };
        let kind = r.as_ref().err().map(|e| match e {
            StoreError::Conflict { .. } => "conflict",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Full(_) => "full",
            StoreError::Invalid(_) => "invalid",
            _ => "other",
        });
        if let (Some(s), Some(kind)) = (&mut span, kind) {
            s.failed(kind);
        }
        if let Some(m) = haven_telemetry::get() {
            m.store_commit.observe(started.elapsed().as_secs_f64());
            if let Some(kind) = kind {
                m.store_commit_errors
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .inc();
            }
        }
        r
    }
    async fn check_writable(&self) -> StoreResult<()> {
        self.inner.check_writable().await
    }
});

/// Reads the node's state into the gauges.
async fn refresh(admin: &Admin) {
    let Some(m) = haven_telemetry::get() else {
        return;
    };
    let e = &admin.engine;
    m.sessions_open.set(e.live_sessions() as i64);
    m.running_requests.set(e.running_requests() as i64);
    m.draining.set(e.is_draining() as i64);
    let store = e.store();
    if let Ok(counts) =
        haven_mcp::engine::tasks::count_by_state(&**store, &e.config().node_id).await
    {
        for (state, n) in haven_telemetry::TaskState::ALL.into_iter().zip(counts) {
            m.tasks
                .get_or_create(&haven_telemetry::TaskStateLabel { state })
                .set(n as i64);
        }
    }
    m.store_writable
        .set(store.check_writable().await.is_ok() as i64);
    let d = store.describe().await;
    if let Some(seq) = d["last_seq"].as_u64() {
        m.store_last_seq.set(seq as i64);
    } else if let Ok(seq) = store.last_seq().await {
        m.store_last_seq.set(seq as i64);
    }
    if d["backend"] == "nats" {
        m.nats_connected
            .set((d["connection"].as_str() == Some("Connected")) as i64);
        m.stream_has_quorum
            .set(d["leader"].as_str().is_some_and(|l| !l.is_empty()).into());
    } else {
        m.nats_connected.set(0);
        m.stream_has_quorum.set(1);
    }
    // Regions.
    if let Some(r) = &admin.control.regions {
        for p in r.status().await {
            let label = PeerLabel {
                peer_region: p.name.clone(),
            };
            m.region_link_up
                .get_or_create(&label)
                .set((p.link == "replicating") as i64);
            if let Some(lag) = p.lag_seconds {
                m.replication_lag_seconds.get_or_create(&label).set(lag);
            }
            if let Some(behind) = p.behind_entries {
                m.replication_lag_entries
                    .get_or_create(&label)
                    .set(behind as i64);
            }
        }
        let roles = haven_cluster::regions::read_roles(&**store)
            .await
            .map(|(r, _)| r)
            .unwrap_or_default();
        m.region_primary
            .set((haven_cluster::regions::role_of(&roles, &admin.region) == "active") as i64);
    } else {
        m.region_primary.set(1);
    }
    // Backups (the main target). Without one the backup series are absent, not 0 (a lag of
    // 0 would say "all shipped"); a node in standby (another node of the region holds the
    // shipping lease) or not started yet knows no shipped position, so it shows no lag.
    if let Some(s) = admin.backup.first() {
        let st = s.status().await;
        if matches!(st.state.as_str(), "standby" | "starting") {
            m.backup_lag_entries.clear();
        } else {
            m.backup_lag_entries
                .get_or_create(&haven_telemetry::NoLabels)
                .set(st.lag_entries as i64);
        }
        let secs = |ms: Option<u64>| ms.map(|ms| (ms / 1000) as i64);
        for (kind, at) in [
            (
                "segment",
                secs(st.last_ship_millis.or(st.last_segment_millis)),
            ),
            ("snapshot", secs(st.last_snapshot_millis)),
            (
                "verification",
                secs(
                    st.last_verification
                        .as_ref()
                        .filter(|v| v.ok)
                        .map(|v| v.at_millis),
                ),
            ),
        ] {
            if let Some(at) = at {
                m.backup_last_success
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .set(at);
            }
        }
        // Failures since start, each kind from 0 (so that the first failure is an increase).
        for (kind, n) in [
            ("segment", st.failures.segment),
            ("snapshot", st.failures.snapshot),
            ("verification", st.failures.verification),
        ] {
            let c = m
                .backup_failures
                .get_or_create(&KindLabel { kind: kind.into() });
            let seen = c.get();
            if n > seen {
                c.inc_by(n - seen);
            }
        }
    }
    // Upstreams: the registered ones only (a removed upstream's series go).
    let statuses = admin.control.upstreams.status();
    m.upstream_up.clear();
    m.upstream_breaker_open.clear();
    for u in statuses {
        let label = UpstreamLabel {
            upstream: u.name.clone(),
        };
        let state = serde_json::to_value(u.state).unwrap_or_default();
        m.upstream_up
            .get_or_create(&label)
            .set(matches!(state.as_str(), Some("connected") | Some("breaker-open")) as i64);
        m.upstream_breaker_open
            .get_or_create(&label)
            .set((state.as_str() == Some("breaker-open")) as i64);
    }
    let newest = admin
        .control
        .in_force
        .read()
        .entries
        .values()
        .filter_map(|e| e.set_millis)
        .max();
    m.settings_changed
        .set(newest.map_or(0, |ms| (ms / 1000) as i64));
    m.audit_dropped.set(admin.control.audit.dropped() as i64);
    let drill = crate::status::last_drill(&**store, crate::status::DRILL_SUCCESS_KEY).await;
    m.drill_last_success.set(
        drill
            .and_then(|d| d["finished_millis"].as_u64())
            .map_or(0, |ms| (ms / 1000) as i64),
    );
    m.process.refresh();
}

/// `GET /metrics`.
pub async fn serve(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    let Some(m) = haven_telemetry::get() else {
        return crate::admin::error(
            axum::http::StatusCode::NOT_FOUND,
            "metrics are not enabled in this process",
        );
    };
    refresh(&admin).await;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (body, content_type) = if haven_telemetry::wants_openmetrics(accept) {
        (m.openmetrics(), haven_telemetry::OPENMETRICS_CONTENT_TYPE)
    } else {
        (
            m.prometheus_text(),
            haven_telemetry::PROMETHEUS_CONTENT_TYPE,
        )
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
