//! The trace context of a write, carried beside it and never in it: the W3C `traceparent`
//! of the (sampled) span that commits a batch, set by the caller around [`crate::Store::commit`]
//! and, on a shared log that can hold message headers (JetStream), stored in a header of the
//! commit's last entry (a batch may carry several commits). A region that replicates the batch links its own span to it. It is no
//! part of a record, of its encoding, of merges or of digests: a batch written without it is
//! the same batch.

tokio::task_local! {
    static TRACEPARENT: Option<String>;
}

/// The longest value kept (a W3C `traceparent` of version 00 is 55 characters).
pub const MAX_TRACEPARENT: usize = 128;

/// Runs `fut` (a commit) with `traceparent` as the trace context of its writes.
pub async fn with_traceparent<F: std::future::Future>(
    traceparent: Option<String>,
    fut: F,
) -> F::Output {
    let traceparent = traceparent.filter(|t| t.len() <= MAX_TRACEPARENT && t.is_ascii());
    TRACEPARENT.scope(traceparent, fut).await
}

/// The trace context of the writes being committed in this task, if any.
pub fn current_traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_traceparent_is_seen_inside_the_scope_only() {
        assert_eq!(current_traceparent(), None);
        let inside =
            with_traceparent(Some("00-ab-cd-01".into()), async { current_traceparent() }).await;
        assert_eq!(inside.as_deref(), Some("00-ab-cd-01"));
        let long = with_traceparent(Some("x".repeat(500)), async { current_traceparent() }).await;
        assert_eq!(long, None, "an oversized value is dropped");
        assert_eq!(current_traceparent(), None);
    }
}
