//! Haven's metrics: one Prometheus registry per process ([`install`]d by the binary at start,
//! with the node's `region` and `node` as constant labels), the families every layer records
//! into, and the two text encodings `/metrics` serves (OpenMetrics, with exemplars, when the
//! scraper asks for it; the Prometheus text format otherwise).
//!
//! Lower layers record through [`get`], which is `None` until a registry is installed: the
//! simulator and unit tests record nothing and pay one atomic load. Names follow the
//! OpenTelemetry MCP semantic conventions where they exist (`mcp.server.operation.duration`
//! becomes `mcp_server_operation_duration_seconds`, with `mcp_method_name`,
//! `gen_ai_tool_name` and `rpc_response_status_code` labels) and Prometheus naming otherwise
//! (`haven_*`, `process_*`). Every label takes values from a bounded set: method names Haven
//! knows, tool names its catalog lists (anything else is `_other`), upstream and region names
//! the operator configured; never a session id, a request id or a client's text.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub mod process;
pub mod recent;
pub mod trace;

/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format (0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels of an MCP request's duration. Each value is borrowed where it can be (a known
/// method, version or tool name): recording a request then allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The JSON-RPC method (`tools/call`), or `_other` for a method Haven does not serve.
    pub mcp_method_name: Cow<'static, str>,
    /// The tool of a `tools/call` when the catalog lists it, `_other` when it does not, ""
    /// for other methods.
    pub gen_ai_tool_name: Cow<'static, str>,
    /// The protocol version the request was made under.
    pub mcp_protocol_version: Cow<'static, str>,
    /// `legacy` (sessions) or `stateless` (2026-07-28).
    pub era: Era,
    /// `ok` or `error` (a JSON-RPC error; a tool result with `isError` is `ok`).
    pub outcome: Outcome,
    /// The JSON-RPC error code of an error, "" otherwise.
    pub rpc_response_status_code: Cow<'static, str>,
}

/// Every request looks its label set up in the family's map, whose hasher (SipHash) costs by
/// the byte and by the call: the labels are folded into one word first (FNV-1a over each
/// value and a separator), and the map hashes only that. Equal label sets fold alike.
impl std::hash::Hash for OperationLabels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for value in [
            &self.mcp_method_name,
            &self.gen_ai_tool_name,
            &self.mcp_protocol_version,
            &self.rpc_response_status_code,
        ] {
            for b in value.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(PRIME);
            }
            // 0xff never occurs in UTF-8: ("ab", "") and ("a", "b") fold apart.
            h = (h ^ 0xff).wrapping_mul(PRIME);
        }
        h = (h ^ self.era as u64).wrapping_mul(PRIME);
        h = (h ^ self.outcome as u64).wrapping_mul(PRIME);
        state.write_u64(h);
    }
}

/// The protocol era of a request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Era {
    /// The session era (2025-11-25 and before).
    #[allow(non_camel_case_types)]
    legacy,
    /// The stateless era (2026-07-28).
    #[allow(non_camel_case_types)]
    stateless,
}

/// How a request or call ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Answered with a result.
    #[allow(non_camel_case_types)]
    ok,
    /// Answered with an error.
    #[allow(non_camel_case_types)]
    error,
}

/// The exemplar of a duration: the trace the request belonged to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    /// W3C trace id (32 hex digits).
    pub trace_id: String,
}

/// A label set of one name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

/// A label set naming another region.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The other region.
    pub peer_region: String,
}

/// A label set naming an upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// The upstream's registered name.
    pub upstream: String,
}

/// Labels of an upstream call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamCallLabels {
    /// The upstream's registered name.
    pub upstream: String,
    /// How the call ended.
    pub outcome: Outcome,
}

/// The state of an MCP task, as Haven names it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TaskState {
    /// Running.
    working,
    /// Waiting for the client's input.
    input_required,
    /// Ended with a result.
    completed,
    /// Ended with an error.
    failed,
    /// Cancelled by the client.
    cancelled,
}

impl TaskState {
    /// Every state, in a fixed order.
    pub const ALL: [TaskState; 5] = [
        TaskState::working,
        TaskState::input_required,
        TaskState::completed,
        TaskState::failed,
        TaskState::cancelled,
    ];
}

/// A label set naming a task state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskStateLabel {
    /// The state.
    pub state: TaskState,
}

/// The empty label set: a [`Family`] of it holds one series once set and none before, so a
/// gauge that means nothing on some nodes (the backup lag of a node that ships no backup) is
/// absent from `/metrics` there rather than a misleading 0.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct NoLabels;

impl EncodeLabelSet for NoLabels {
    fn encode(
        &self,
        _encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

/// A gauge without labels that is absent from `/metrics` until it is first set (and again
/// after [`Family::clear`]).
pub type OptionalGauge = Family<NoLabels, Gauge>;

/// A label set of the build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Haven's version.
    pub version: String,
}

/// Every family Haven records into.
pub struct Metrics {
    registry: Registry,
    /// `mcp_server_operation_duration_seconds`.
    pub operations: Family<OperationLabels, HistogramWithExemplars<TraceExemplar>>,
    /// `haven_sessions_open`.
    pub sessions_open: Gauge,
    /// `haven_sse_streams_open`.
    pub sse_streams_open: Gauge,
    /// `haven_sse_resumptions_total`.
    pub sse_resumptions: Counter,
    /// `haven_running_requests`.
    pub running_requests: Gauge,
    /// `haven_store_commit_duration_seconds`.
    pub store_commit: Histogram,
    /// `haven_store_commit_errors_total` by kind.
    pub store_commit_errors: Family<KindLabel, Counter>,
    /// `haven_store_writable`.
    pub store_writable: Gauge,
    /// `haven_store_last_seq`.
    pub store_last_seq: Gauge,
    /// `haven_nats_connected`.
    pub nats_connected: Gauge,
    /// `haven_stream_has_quorum`.
    pub stream_has_quorum: Gauge,
    /// `haven_region_primary`.
    pub region_primary: Gauge,
    /// `haven_region_link_up` by peer.
    pub region_link_up: Family<PeerLabel, Gauge>,
    /// `haven_replication_lag_seconds` by peer (milliseconds kept, seconds shown).
    pub replication_lag_seconds: Family<PeerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `haven_replication_lag_entries` by peer.
    pub replication_lag_entries: Family<PeerLabel, Gauge>,
    /// `haven_backup_lag_entries`: absent on a node that ships no backup (none configured, or
    /// another node of the region holds the shipping lease). Set it through
    /// `backup_lag_entries.get_or_create(&NoLabels)`.
    pub backup_lag_entries: OptionalGauge,
    /// `haven_backup_last_success_timestamp_seconds` by kind.
    pub backup_last_success: Family<KindLabel, Gauge>,
    /// `haven_backup_failures_total` by kind.
    pub backup_failures: Family<KindLabel, Counter>,
    /// `haven_tasks` by state.
    pub tasks: Family<TaskStateLabel, Gauge>,
    /// `haven_upstream_up` by upstream.
    pub upstream_up: Family<UpstreamLabel, Gauge>,
    /// `haven_upstream_breaker_open` by upstream.
    pub upstream_breaker_open: Family<UpstreamLabel, Gauge>,
    /// `haven_upstream_call_duration_seconds`.
    pub upstream_calls: Family<UpstreamCallLabels, Histogram>,
    /// `haven_takeovers_total`.
    pub takeovers: Counter,
    /// `haven_interrupted_requests_total`.
    pub interrupted: Counter,
    /// `haven_draining`.
    pub draining: Gauge,
    /// `haven_settings_last_change_timestamp_seconds`.
    pub settings_changed: Gauge,
    /// `haven_drill_last_success_timestamp_seconds`.
    pub drill_last_success: Gauge,
    /// `haven_audit_dropped_total` (a count kept by the audit writer, mirrored at scrape).
    pub audit_dropped: Gauge,
    /// `haven_rate_limited_total` by kind (address, principal, tool).
    pub rate_limited: Family<KindLabel, Counter>,
    /// `haven_auth_failures_total`.
    pub auth_failures: Counter,
    /// `haven_admission_refused_total` by kind (`node`, `session`, `delay`).
    pub admission_refused: Family<KindLabel, Counter>,
    /// `haven_scheduling_delay_seconds`: how long the last probe task waited in the runtime's queues.
    pub scheduling_delay: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `haven_calls_denied_total` (authorization rules).
    pub calls_denied: Counter,
    /// The process metrics, refreshed at scrape.
    pub process: process::ProcessMetrics,
    /// The last day's requests by minute, for the status page and the heartbeat.
    pub recent: recent::Recent,
}

fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ]
    .into_iter()
}

impl Metrics {
    /// A registry whose every series carries `region` and `node`.
    pub fn new(region: &str, node: &str, version: &str) -> Metrics {
        let mut registry = Registry::with_labels(
            [
                ("region".into(), region.to_owned().into()),
                ("node".into(), node.to_owned().into()),
            ]
            .into_iter(),
        );
        let operations =
            Family::<OperationLabels, HistogramWithExemplars<TraceExemplar>>::new_with_constructor(
                (|| HistogramWithExemplars::new(duration_buckets())) as fn() -> _,
            );
        let upstream_calls = Family::<UpstreamCallLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(duration_buckets())) as fn() -> _,
        );
        let m = Metrics {
            operations,
            sessions_open: Gauge::default(),
            sse_streams_open: Gauge::default(),
            sse_resumptions: Counter::default(),
            running_requests: Gauge::default(),
            store_commit: Histogram::new(duration_buckets()),
            store_commit_errors: Family::default(),
            store_writable: Gauge::default(),
            store_last_seq: Gauge::default(),
            nats_connected: Gauge::default(),
            stream_has_quorum: Gauge::default(),
            region_primary: Gauge::default(),
            region_link_up: Family::default(),
            replication_lag_seconds: Family::default(),
            replication_lag_entries: Family::default(),
            backup_lag_entries: Family::default(),
            backup_last_success: Family::default(),
            backup_failures: Family::default(),
            tasks: Family::default(),
            upstream_up: Family::default(),
            upstream_breaker_open: Family::default(),
            upstream_calls,
            takeovers: Counter::default(),
            interrupted: Counter::default(),
            draining: Gauge::default(),
            settings_changed: Gauge::default(),
            drill_last_success: Gauge::default(),
            audit_dropped: Gauge::default(),
            rate_limited: Family::default(),
            auth_failures: Counter::default(),
            admission_refused: Family::default(),
            scheduling_delay: Gauge::default(),
            calls_denied: Counter::default(),
            process: process::ProcessMetrics::default(),
            recent: recent::Recent::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register_with_unit(
            "mcp_server_operation_duration",
            "Duration of MCP requests, from arrival to the final answer",
            Unit::Seconds,
            m.operations.clone(),
        );
        r.register(
            "haven_sessions_open",
            "Legacy sessions live on this node",
            m.sessions_open.clone(),
        );
        r.register(
            "haven_sse_streams_open",
            "SSE streams open on this node",
            m.sse_streams_open.clone(),
        );
        r.register(
            "haven_sse_resumptions",
            "SSE streams resumed with Last-Event-ID",
            m.sse_resumptions.clone(),
        );
        r.register(
            "haven_running_requests",
            "Requests running on this node",
            m.running_requests.clone(),
        );
        r.register_with_unit(
            "haven_store_commit_duration",
            "Store commit latency",
            Unit::Seconds,
            m.store_commit.clone(),
        );
        r.register(
            "haven_store_commit_errors",
            "Failed store commits by kind",
            m.store_commit_errors.clone(),
        );
        r.register(
            "haven_store_writable",
            "1 when the store takes writes",
            m.store_writable.clone(),
        );
        r.register(
            "haven_store_last_seq",
            "Last sequence of the store's change log",
            m.store_last_seq.clone(),
        );
        r.register(
            "haven_nats_connected",
            "1 when the node's NATS connection is up (0 on the embedded store)",
            m.nats_connected.clone(),
        );
        r.register(
            "haven_stream_has_quorum",
            "1 when the region's JetStream stream has a leader (1 on the embedded store)",
            m.stream_has_quorum.clone(),
        );
        r.register(
            "haven_region_primary",
            "1 when this region holds the active role",
            m.region_primary.clone(),
        );
        r.register(
            "haven_region_link_up",
            "1 when replication from the peer region is running",
            m.region_link_up.clone(),
        );
        r.register_with_unit(
            "haven_replication_lag",
            "Age of the newest entry of the peer region not yet applied here",
            Unit::Seconds,
            m.replication_lag_seconds.clone(),
        );
        r.register(
            "haven_replication_lag_entries",
            "Entries of the peer region not yet applied here",
            m.replication_lag_entries.clone(),
        );
        r.register(
            "haven_backup_lag_entries",
            "Change-log entries not yet shipped to the backup target",
            m.backup_lag_entries.clone(),
        );
        r.register(
            "haven_backup_last_success_timestamp_seconds",
            "Last successful backup segment, snapshot or verification (Unix seconds)",
            m.backup_last_success.clone(),
        );
        r.register(
            "haven_backup_failures",
            "Failed backup shipping or verification attempts",
            m.backup_failures.clone(),
        );
        r.register(
            "haven_tasks",
            "Tasks this node runs or ran last, held in its region's store, by state",
            m.tasks.clone(),
        );
        r.register(
            "haven_upstream_up",
            "1 when the upstream is connected",
            m.upstream_up.clone(),
        );
        r.register(
            "haven_upstream_breaker_open",
            "1 when the upstream's circuit breaker is open",
            m.upstream_breaker_open.clone(),
        );
        r.register_with_unit(
            "haven_upstream_call_duration",
            "Calls to upstream MCP servers",
            Unit::Seconds,
            m.upstream_calls.clone(),
        );
        r.register(
            "haven_takeovers",
            "Requests and tasks taken over from a dead node or region",
            m.takeovers.clone(),
        );
        r.register(
            "haven_interrupted_requests",
            "Requests that ended interrupted",
            m.interrupted.clone(),
        );
        r.register(
            "haven_draining",
            "1 while the node drains",
            m.draining.clone(),
        );
        r.register(
            "haven_settings_last_change_timestamp_seconds",
            "When the newest runtime setting in force was set (Unix seconds; 0: all defaults)",
            m.settings_changed.clone(),
        );
        r.register(
            "haven_drill_last_success_timestamp_seconds",
            "When the region's last successful drill ended (Unix seconds; 0: none on record)",
            m.drill_last_success.clone(),
        );
        r.register(
            "haven_audit_dropped",
            "Audit records dropped because the queue was full (count since start)",
            m.audit_dropped.clone(),
        );
        r.register(
            "haven_rate_limited",
            "Requests refused by a rate limit, by kind",
            m.rate_limited.clone(),
        );
        r.register(
            "haven_admission_refused",
            "MCP requests refused by admission control, by kind (node: the node's limit and queue; session: one session's limit; delay: shed while work waits too long for the CPU)",
            m.admission_refused.clone(),
        );
        r.register_with_unit(
            "haven_scheduling_delay",
            "How long the last probe task waited in the node's runtime queues (one every 100 ms): the wait for the CPU",
            Unit::Seconds,
            m.scheduling_delay.clone(),
        );
        r.register(
            "haven_auth_failures",
            "Credentials refused on /mcp and the admin API",
            m.auth_failures.clone(),
        );
        r.register(
            "haven_calls_denied",
            "Calls refused by authorization rules or admin roles",
            m.calls_denied.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: version.to_owned(),
            })
            .set(1);
        r.register("haven_build_info", "Haven's build (value 1)", build);
        m.process.register(r);
        Metrics { registry, ..m }
    }

    /// Records an MCP request's duration, with the trace it belonged to as exemplar.
    pub fn operation(&self, labels: &OperationLabels, took: Duration, trace_id: Option<&str>) {
        let exemplar = trace_id.map(|t| TraceExemplar {
            trace_id: t.to_owned(),
        });
        self.operations
            .get_or_create(labels)
            .observe(took.as_secs_f64(), exemplar, None);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.recent.record(
            now,
            took.as_secs_f64(),
            labels.outcome == Outcome::error
                && recent::is_server_error(&labels.rpc_response_status_code),
            !recent::is_long_by_design(&labels.mcp_method_name, &labels.gen_ai_tool_name),
        );
    }

    /// The registry in OpenMetrics text (with exemplars).
    pub fn openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The registry in the Prometheus text format 0.0.4 (no exemplars).
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Installs the process's registry (once; a second call is ignored and returns the first).
pub fn install(metrics: Metrics) -> &'static Metrics {
    let _ = METRICS.set(metrics);
    METRICS.get().expect("just set")
}

/// The process's registry, once installed.
pub fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The trace id of a W3C `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`), if valid and
/// not all zeros.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0'))
    .then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_encodings_carry_the_node_labels_and_only_openmetrics_the_exemplars() {
        let m = Metrics::new("eu", "n1", "0.1.0");
        let labels = OperationLabels {
            mcp_method_name: "tools/call".into(),
            gen_ai_tool_name: "echo".into(),
            mcp_protocol_version: "2026-07-28".into(),
            era: Era::stateless,
            outcome: Outcome::ok,
            rpc_response_status_code: "".into(),
        };
        m.operation(
            &labels,
            Duration::from_millis(3),
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        m.sse_resumptions.inc();
        let om = m.openmetrics();
        assert!(
            om.contains("mcp_server_operation_duration_seconds_bucket{"),
            "{om}"
        );
        assert!(
            om.contains("region=\"eu\"") && om.contains("node=\"n1\""),
            "{om}"
        );
        assert!(
            om.contains("trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\""),
            "{om}"
        );
        assert!(om.contains("haven_sse_resumptions_total"), "{om}");
        assert!(
            om.contains("haven_build_info{") && om.ends_with("# EOF\n"),
            "{om}"
        );
        let text = m.prometheus_text();
        assert!(
            !text.contains("trace_id") && !text.contains("# EOF"),
            "{text}"
        );
        assert!(text.contains("gen_ai_tool_name=\"echo\""), "{text}");
    }

    #[test]
    fn label_sets_fold_to_one_series_each() {
        let m = Metrics::new("eu", "n1", "0.1.0");
        let labels = |method: &'static str, tool: String, outcome| OperationLabels {
            mcp_method_name: method.into(),
            gen_ai_tool_name: tool.into(),
            mcp_protocol_version: "2026-07-28".into(),
            era: Era::stateless,
            outcome,
            rpc_response_status_code: "".into(),
        };
        // The same set, borrowed and owned, is one series; sets that differ only in where
        // one value ends and the next begins, or in an enum, are apart.
        for l in [
            labels("tools/call", "echo".to_owned(), Outcome::ok),
            labels("tools/call", String::from("ec") + "ho", Outcome::ok),
            labels("tools/call", "echo".to_owned(), Outcome::error),
            labels("tools/cal", "lecho".to_owned(), Outcome::ok),
        ] {
            m.operation(&l, Duration::from_millis(1), None);
        }
        let text = m.prometheus_text();
        let count = |needle: &str| {
            text.lines()
                .filter(|l| l.starts_with("mcp_server_operation_duration_seconds_count"))
                .filter(|l| l.contains(needle))
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
                .collect::<std::collections::BTreeSet<_>>()
        };
        // (The family's map has no order: the two `echo` series are compared as a set.)
        assert_eq!(
            count("gen_ai_tool_name=\"echo\""),
            ["1", "2"].map(String::from).into(),
            "{text}"
        );
        assert_eq!(
            count("gen_ai_tool_name=\"lecho\""),
            ["1".to_owned()].into(),
            "{text}"
        );
    }

    #[test]
    fn backup_series_are_absent_until_a_backup_reports() {
        let m = Metrics::new("eu", "n1", "0.1.0");
        for text in [m.openmetrics(), m.prometheus_text()] {
            assert!(!text.contains("haven_backup"), "{text}");
        }
        m.backup_lag_entries.get_or_create(&NoLabels).set(7);
        for text in [m.openmetrics(), m.prometheus_text()] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("haven_backup_lag_entries{")
                        && l.contains("region=\"eu\"")
                        && l.contains("node=\"n1\"")
                        && !l.contains(",,")
                        && !l.contains("{,")
                        && l.ends_with("} 7")),
                "{text}"
            );
        }
        m.backup_lag_entries.clear();
        assert!(!m.prometheus_text().contains("haven_backup"));
    }

    #[test]
    fn traceparents_are_checked() {
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
    }
}
