//! What a node does about work a dead process left behind: streams whose request was running
//! get a final JSON-RPC error (never silence), and tasks are resumed or failed.

use std::sync::Arc;

use haven_state::{Batch, Expect, StoreError};
use rmcp::model::{ErrorCode, ErrorData, NumberOrString};
use serde_json::Value;

use super::Inner;
use super::dispatch::Call;
use super::legacy::STANDALONE;
use super::tasks::{self, TASKS_NS, TaskRecord};
use crate::context::Era;
use crate::jsonrpc;
use crate::stream::{self, INFLIGHT_NS, InflightRecord};

/// Whether the process that owns a record is gone. A different boot id of this node means
/// the process restarted; other nodes are judged by their heartbeat records in cluster mode.
pub(crate) fn owner_is_dead(inner: &Inner, node: &str, boot: &str) -> bool {
    let now = inner.store.clock().wall_millis();
    inner.membership.is_dead(inner, node, boot, now)
}

/// The error a client gets on a stream whose request was cut off by a dying process.
pub(crate) fn interrupted_error() -> ErrorData {
    ErrorData::new(
        ErrorCode::INTERNAL_ERROR,
        "The request was interrupted because the server process handling it stopped; it may be retried.",
        Some(serde_json::json!({ "interrupted": true, "retryable": true })),
    )
}

/// Runs an interrupted `tools/call` again on this node when its tool is annotated idempotent
/// (`idempotentHint`): the in-flight record is claimed by compare-and-set (so one node does
/// it), and the new run's events continue the same stream. Returns whether the request was
/// taken care of (run again here, or already claimed by another node).
///
/// Only work of *another* node is run again: a node that restarts ends its own interrupted
/// streams with an error, and the client decides whether to retry.
async fn rerun(inner: &Arc<Inner>, rec: &InflightRecord) -> bool {
    if rec.method != "tools/call" || rec.node == inner.config.node_id {
        return false;
    }
    let Some(Value::Object(params)) = rec.params.clone() else {
        return false;
    };
    let Some(name) = params
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return false;
    };
    let Ok(Some(loaded)) = crate::session::load(&*inner.store, &rec.session).await else {
        return false;
    };
    let id = match &rec.request_id {
        Value::Number(n) => match n.as_i64() {
            Some(n) => NumberOrString::Number(n),
            None => return false,
        },
        Value::String(s) => NumberOrString::String(s.as_str().into()),
        _ => return false,
    };
    let call = Call {
        id,
        method: rec.method.clone(),
        params,
        era: Era::Legacy {
            session: rec.session.clone(),
            protocol_version: loaded.record.protocol_version.clone(),
        },
        caller: super::legacy::caller_of(&loaded.record),
        progress_token: None,
    };
    let Ok((tools, index)) = inner.tools_for(&call).await else {
        return false;
    };
    let idempotent = index
        .get(&name)
        .and_then(|i| tools[*i].annotations.as_ref())
        .and_then(|a| a.idempotent_hint)
        .unwrap_or(false);
    if !idempotent {
        return false;
    }
    // Claim it.
    let key = stream::inflight_key(&rec.session, &rec.stream);
    let Ok(Some(current)) = inner.store.get(INFLIGHT_NS, &key).await else {
        return true;
    };
    let mut mine = rec.clone();
    mine.node = inner.config.node_id.clone();
    mine.boot = inner.config.boot_id.clone();
    let claim = Batch::new().put_if(
        INFLIGHT_NS,
        &key,
        serde_json::to_vec(&mine).expect("in-flight record serializes"),
        Expect::Revision(current.revision),
    );
    match inner.store.commit(claim).await {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => return true,
        Err(e) => {
            tracing::warn!(error = %e, "could not claim an interrupted request");
            return true;
        }
    }
    tracing::info!(
        session = %rec.session,
        stream = %rec.stream,
        tool = %name,
        dead_node = %rec.node,
        "running an interrupted idempotent tool call again"
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = Inner::running_key(&rec.session, &call.id);
    inner.running.lock().insert(running.clone(), cancel.clone());
    let cancel_rx = inner
        .hub
        .subscribe(crate::hub::Topic::key(super::legacy::CANCELS_NS, &running));
    {
        let inner = inner.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            super::dispatch::run(inner.clone(), call, tx, cancel).await;
            inner.running.lock().remove(&running);
        });
    }
    tokio::spawn(super::legacy::pump(
        inner.clone(),
        rec.session.clone(),
        rec.stream.clone(),
        rx,
        None,
        cancel,
        cancel_rx,
    ));
    true
}

/// Ends the stream of an interrupted request with an error event, once (compare-and-set on the
/// in-flight record, so two nodes cannot both do it) — unless an idempotent tool call can be
/// run again instead.
pub(crate) async fn interrupt(inner: &Arc<Inner>, rec: &InflightRecord) {
    if rerun(inner, rec).await {
        return;
    }
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
