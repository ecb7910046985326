//! Trace context: W3C `traceparent` values in and out of `tracing` spans, which the
//! `tracing-opentelemetry` layer (installed by the binary when `--otlp-endpoint` is given)
//! turns into OpenTelemetry spans. Without that layer these functions do nothing harmful:
//! spans carry no OpenTelemetry context and [`current_traceparent`] is `None`.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The longest `tracestate` kept (W3C allows 32 members of at most 256 characters each; a
/// longer value is dropped, not cut).
const MAX_TRACESTATE: usize = 512;

/// The remote parent a valid `traceparent` names (with its `tracestate`, when valid).
pub fn remote_context(
    traceparent: &str,
    tracestate: Option<&str>,
) -> Option<opentelemetry::Context> {
    let sc = span_context(traceparent, tracestate)?;
    Some(opentelemetry::Context::new().with_remote_span_context(sc))
}

/// The span context a valid `traceparent` names, remote.
fn span_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let trace = crate::trace_id_of(traceparent)?;
    let mut parts = traceparent.split('-').skip(2);
    let span = parts.next()?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        tracestate
            .filter(|t| t.len() <= MAX_TRACESTATE)
            .and_then(|t| t.parse::<TraceState>().ok())
            .unwrap_or_default(),
    );
    sc.is_valid().then_some(sc)
}

/// The target of the server span of every MCP request (and of the client span of every call
/// to an upstream), at `debug`: the log formats its fields
/// only when asked for `debug` (a node logging at `info` would otherwise format every
/// request's fields for lines that are rarely written), while a trace exporter always takes
/// it (the binary's trace filter names this target).
pub const REQUEST_SPAN_TARGET: &str = "haven::request";

/// Makes the span `traceparent` names the parent of `span` (nothing for a missing or invalid
/// value: the span starts a trace of its own).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if span.is_none() {
        return;
    }
    if let Some(cx) = traceparent.and_then(|t| remote_context(t, tracestate)) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span `traceparent` names (work that continues what that span began:
/// a takeover, an adoption, a replicated write). Nothing for a missing or invalid value.
pub fn add_link(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(|t| span_context(t, None)) {
        span.add_link(sc);
    }
}

/// The `traceparent` of the current span when it is sampled (exported): what is stored with
/// work another node or region may continue, so that it can link back. `None` otherwise, so
/// that nothing is stored when tracing is off or the trace not sampled.
pub fn sampled_traceparent() -> Option<String> {
    sampled_traceparent_of(&tracing::Span::current())
}

/// The `traceparent` of `span` when it is sampled, read without entering it.
pub fn sampled_traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let s = cx.span();
    let sc = s.span_context();
    sc.is_sampled().then(|| traceparent(sc))
}

/// The W3C `traceparent` value of `sc` (made for every traced request: written out here
/// rather than through `format!` and the ids' `Display`, which cost several times more).
fn traceparent(sc: &SpanContext) -> String {
    fn hex(out: &mut String, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in bytes {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
    }
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    hex(&mut out, &sc.trace_id().to_bytes());
    out.push('-');
    hex(&mut out, &sc.span_id().to_bytes());
    out.push('-');
    hex(&mut out, &[sc.trace_flags().to_u8()]);
    out
}

/// The tracer [`InnerSpan`]s are made with: the exporting one, set once by the binary.
static TRACER: std::sync::OnceLock<opentelemetry::global::BoxedTracer> = std::sync::OnceLock::new();

/// Sets the tracer [`inner_span`] makes its spans with (the one the `tracing` layer exports
/// through). Later calls change nothing.
pub fn set_tracer(tracer: opentelemetry::global::BoxedTracer) {
    let _ = TRACER.set(tracer);
}

/// A span made directly with OpenTelemetry, for short internal work done many times per
/// request (a store commit): it never passes through `tracing` (no registry entry, no field
/// formatting, no per-layer bookkeeping), and ends when dropped.
pub struct InnerSpan {
    span: opentelemetry::global::BoxedSpan,
    traceparent: String,
}

impl InnerSpan {
    /// The span's `traceparent`, to pass on with the work (it is always sampled).
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// Marks the span failed, with the error's kind as `error.type`.
    pub fn failed(&mut self, kind: &'static str) {
        use opentelemetry::trace::Span as _;
        self.span
            .set_attribute(opentelemetry::KeyValue::new("error.type", kind));
        self.span
            .set_status(opentelemetry::trace::Status::error(kind));
    }
}

impl Drop for InnerSpan {
    fn drop(&mut self) {
        use opentelemetry::trace::Span as _;
        self.span.end();
    }
}

/// A child span named `name` (kind internal) of `parent`, when `parent` belongs to a sampled
/// trace and a tracer is set; `None` otherwise, so that unsampled work costs nothing.
pub fn inner_span(parent: &tracing::Span, name: &'static str) -> Option<InnerSpan> {
    use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
    if parent.is_none() {
        return None;
    }
    let tracer = TRACER.get()?;
    let cx = parent.context();
    if !cx.span().span_context().is_sampled() {
        return None;
    }
    let span = tracer.build_with_context(
        opentelemetry::trace::SpanBuilder::from_name(name).with_kind(SpanKind::Internal),
        &cx,
    );
    let traceparent = traceparent(span.span_context());
    Some(InnerSpan { span, traceparent })
}

/// Renames `span`'s OpenTelemetry span to `name` and sets `key` to `value` on it, also when
/// the span has already started (its context was read): what a span learns only after it
/// was made. Nothing without an OpenTelemetry layer.
pub fn rename(span: &tracing::Span, name: String, key: &'static str, value: &str) {
    if span.is_none() {
        return;
    }
    let cx = span.context();
    let s = cx.span();
    if s.span_context().is_valid() {
        s.update_name(name);
        s.set_attribute(opentelemetry::KeyValue::new(key, value.to_owned()));
    }
}

/// The trace and span ids (hex) of a span's OpenTelemetry context, when it has a valid one.
pub fn ids_of(span: &tracing::Span) -> Option<(String, String)> {
    let cx = span.context();
    let s = cx.span();
    let sc = s.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// The `traceparent` of the current span, to pass the trace on (to an upstream), when
/// tracing is exported.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| traceparent(sc))
}

/// The dispatcher whose OpenTelemetry layer [`WithTraceIds`] reads span contexts from.
static DISPATCH: std::sync::OnceLock<tracing::dispatcher::WeakDispatch> =
    std::sync::OnceLock::new();

/// A JSON log line format that puts `trace_id` and `span_id` (W3C hex) first in every line
/// emitted inside a span with a valid OpenTelemetry context (the nearest such span); other
/// lines are the inner format's unchanged. Call [`carry_trace_ids`] once the subscriber is
/// installed.
pub struct WithTraceIds<F>(pub F);

/// Lets [`WithTraceIds`] read span contexts from the current default dispatcher (the one
/// just installed). Later calls change nothing.
pub fn carry_trace_ids() {
    tracing::dispatcher::get_default(|d| {
        let _ = DISPATCH.set(d.downgrade());
    });
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // The spans around the event as the registry holds them, not as the log's filter
        // sees them: a request's span is traced without being logged at `info`.
        let ids = DISPATCH.get().and_then(|d| d.upgrade()).and_then(|d| {
            use tracing::Subscriber as _;
            use tracing_subscriber::registry::LookupSpan as _;
            let registry = d.downcast_ref::<tracing_subscriber::Registry>()?;
            let id = match event.parent() {
                Some(id) => id.clone(),
                None if event.is_contextual() => registry.current_span().id()?.clone(),
                None => return None,
            };
            registry.span(&id)?.scope().find_map(|span| {
                let cx = tracing_opentelemetry::get_otel_context(&span.id(), &d)?;
                let s = cx.span();
                let sc = s.span_context();
                sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
            })
        });
        let Some((trace, span)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        match line.strip_prefix('{') {
            Some(rest) => {
                let comma = if rest.starts_with('}') { "" } else { "," };
                write!(
                    writer,
                    "{{\"trace_id\":\"{trace}\",\"span_id\":\"{span}\"{comma}{rest}"
                )
            }
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_inside_a_traced_span_carry_its_ids() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let buffer = Buffer::default();
        let out = buffer.clone();
        // As the binary sets them up: the log at `info`, the trace layer taking request spans
        // (at `debug`) too, so that the log does not see the request's span.
        use tracing_subscriber::Layer as _;
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(WithTraceIds(tracing_subscriber::fmt::format().json()))
                    .with_writer(move || out.clone())
                    .with_filter(tracing::level_filters::LevelFilter::INFO),
            )
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(opentelemetry::trace::noop::NoopTracer::new())
                    .with_filter(
                        tracing_subscriber::filter::Targets::new()
                            .with_default(tracing::Level::INFO)
                            .with_target(REQUEST_SPAN_TARGET, tracing::Level::DEBUG),
                    ),
            );
        tracing::subscriber::with_default(subscriber, || {
            carry_trace_ids();
            tracing::info!("outside");
            let span = tracing::debug_span!(target: REQUEST_SPAN_TARGET, "request");
            assert!(!span.is_none(), "the trace layer takes the request span");
            set_parent(
                &span,
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                None,
            );
            span.in_scope(|| tracing::info!(n = 1, "inside"));
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(
            lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{text}"
        );
        assert_eq!(
            lines[1]["span_id"].as_str().map(str::len),
            Some(16),
            "{text}"
        );
        assert_eq!(lines[1]["fields"]["message"], "inside", "{text}");
        assert!(lines[1].get("span").is_none(), "not logged at info: {text}");
    }

    #[test]
    fn a_traceparent_becomes_a_remote_parent() {
        let cx = remote_context(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=abc,other=1"),
        )
        .unwrap();
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(sc.trace_state().get("vendor"), Some("abc"));
        assert!(
            remote_context(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                Some("not a valid state")
            )
            .is_some_and(|c| !c.span().span_context().is_sampled()
                && c.span().span_context().trace_state().header().is_empty())
        );
        assert!(remote_context("garbage", None).is_none());
        assert_eq!(sampled_traceparent(), None);
        // Without an OpenTelemetry layer there is nothing to pass on.
        assert_eq!(current_traceparent(), None);
    }

    #[test]
    fn a_span_context_is_written_as_the_traceparent_it_came_from() {
        for t in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-0000000000000000000000000000000f-f000000000000000-00",
        ] {
            let sc = span_context(t, None).unwrap();
            assert_eq!(traceparent(&sc), t);
            assert_eq!(
                traceparent(&sc),
                format!(
                    "00-{}-{}-{:02x}",
                    sc.trace_id(),
                    sc.span_id(),
                    sc.trace_flags().to_u8()
                )
            );
        }
    }
}
