//! What a node does about work a dead process left behind: streams whose request was running
//! get a final JSON-RPC error (never silence), and tasks are resumed or failed.

use std::sync::Arc;

use haven_state::{Batch, Expect, StoreError};
use rmcp::model::{ErrorCode, ErrorData, NumberOrString};
use serde_json::Value;

use super::Inner;
use super::legacy::STANDALONE;
use super::tasks::{self, TASKS_NS, TaskRecord};
use crate::jsonrpc;
use crate::stream::{self, INFLIGHT_NS, InflightRecord};

/// Whether the process that owns a record is gone. A different boot id of this node means
/// the process restarted; other nodes are judged by their heartbeat records in cluster mode.
pub(crate) fn owner_is_dead(inner: &Inner, node: &str, boot: &str) -> bool {
    node == inner.config.node_id && boot != inner.config.boot_id
}

/// The error a client gets on a stream whose request was cut off by a dying process.
pub(crate) fn interrupted_error() -> ErrorData {
    ErrorData::new(
        ErrorCode::INTERNAL_ERROR,
        "The request was interrupted because the server process handling it stopped; it may be retried.",
        Some(serde_json::json!({ "interrupted": true, "retryable": true })),
    )
}

/// Ends the stream of an interrupted request with an error event, once (compare-and-set on the
/// in-flight record, so two nodes cannot both do it).
pub(crate) async fn interrupt(inner: &Inner, rec: &InflightRecord) {
    let key = stream::inflight_key(&rec.session, &rec.stream);
    let Ok(Some(current)) = inner.store.get(INFLIGHT_NS, &key).await else {
        return;
    };
    let batch = Batch::new().delete_if(INFLIGHT_NS, &key, Expect::Revision(current.revision));
    let batch = if rec.method == STANDALONE {
        batch
    } else {
        let id = match &rec.request_id {
            Value::Number(n) => n.as_i64().map(NumberOrString::Number),
            Value::String(s) => Some(NumberOrString::String(s.as_str().into())),
            _ => None,
        };
        let msg = jsonrpc::error_response(id.as_ref(), &interrupted_error());
        stream::append_ops(batch, &rec.session, &rec.stream, &[(msg, true)])
    };
    match inner.store.commit(batch).await {
        Ok(_) => {
            tracing::info!(session = %rec.session, stream = %rec.stream, method = %rec.method, "ended the stream of an interrupted request")
        }
        Err(StoreError::Conflict { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "could not end an interrupted stream"),
    }
}

/// Scans for work of dead processes of this node and settles it.
pub(crate) async fn recover(inner: &Arc<Inner>) -> Result<(), StoreError> {
    let mut after: Option<String> = None;
    let mut interrupted = 0usize;
    loop {
        let page = inner
            .store
            .scan(INFLIGHT_NS, "", after.as_deref(), 512)
            .await?;
        for r in &page.records {
            let Ok(rec) = serde_json::from_slice::<InflightRecord>(r.value()) else {
                continue;
            };
            if owner_is_dead(inner, &rec.node, &rec.boot) {
                interrupt(inner, &rec).await;
                interrupted += 1;
            }
        }
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    let mut after: Option<String> = None;
    let mut adopted = 0usize;
    loop {
        let page = inner
            .store
            .scan(TASKS_NS, "", after.as_deref(), 512)
            .await?;
        for r in &page.records {
            let Ok(rec) = serde_json::from_slice::<TaskRecord>(r.value()) else {
                continue;
            };
            if !rec.status.is_terminal() && owner_is_dead(inner, &rec.owner_node, &rec.owner_boot) {
                tasks::adopt(inner, rec).await;
                adopted += 1;
            }
        }
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    if interrupted + adopted > 0 {
        tracing::info!(
            interrupted,
            adopted,
            "recovered work left by a previous process"
        );
    }
    Ok(())
}
