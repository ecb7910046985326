//! Trace context: W3C `traceparent` values in and out of `tracing` spans, which the
//! `tracing-opentelemetry` layer (installed by the binary when `--otlp-endpoint` is given)
//! turns into OpenTelemetry spans. Without that layer these functions do nothing harmful:
//! spans carry no OpenTelemetry context and [`current_traceparent`] is `None`.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The remote parent a valid `traceparent` names.
pub fn remote_context(traceparent: &str) -> Option<opentelemetry::Context> {
    let trace = crate::trace_id_of(traceparent)?;
    let mut parts = traceparent.split('-').skip(2);
    let span = parts.next()?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(sc))
}

/// Makes the span `traceparent` names the parent of `span` (nothing for a missing or invalid
/// value: the span starts a trace of its own).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(cx) = traceparent.and_then(remote_context) {
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` of the current span, to pass the trace on (to an upstream), when
/// tracing is exported.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_becomes_a_remote_parent() {
        let cx = remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(
            remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .is_some_and(|c| !c.span().span_context().is_sampled())
        );
        assert!(remote_context("garbage").is_none());
        // Without an OpenTelemetry layer there is nothing to pass on.
        assert_eq!(current_traceparent(), None);
    }
}
