//! What a node does about work whose owner is gone: every execution (a request's stream, a
//! task) has an ownership record (`haven_cluster::ownership`), and the node that finds its
//! owner dead takes it over by compare-and-set — at most one node wins. A request's stream
//! then gets its final answer exactly once: an interrupted idempotent tool call runs again
//! into the same stream, any other request ends with an "interrupted" error that says
//! whether it had changed anything. Tasks are resumed or failed the same way.
//!
//! The same applies to this node's own executions that nothing here runs any more (their
//! handler ended without a final answer): they are found by the same scan and settled.

use std::sync::Arc;

use haven_cluster::{Claim, ClaimError, FencedStore, OWNERS_NS, Owner};
use haven_state::{Batch, StoreError};
use rmcp::model::{ErrorCode, ErrorData, NumberOrString};
use serde_json::Value;

use super::Inner;
use super::dispatch::Call;
use super::legacy::STANDALONE;
use super::tasks;
use crate::context::Era;
use crate::jsonrpc;
use crate::stream::{self, INFLIGHT_NS, InflightRecord};

/// The error a client gets on a stream whose request was cut off by a dying process.
/// `changed` says whether the request had changed state before it was cut off (`None`: not
/// known, e.g. a call to an upstream server).
pub(crate) fn interrupted_error(changed: Option<bool>) -> ErrorData {
    let (message, retryable) = match changed {
        Some(false) => (
            "The request was interrupted because the server process handling it stopped before it changed anything; it may be retried.",
            true,
        ),
        Some(true) => (
            "The request was interrupted because the server process handling it stopped after it had changed state; retrying it may repeat those changes.",
            false,
        ),
        None => (
            "The request was interrupted because the server process handling it stopped; it may or may not have taken effect.",
            false,
        ),
    };
    ErrorData::new(
        ErrorCode::INTERNAL_ERROR,
        message,
        Some(serde_json::json!({
            "interrupted": true,
            "retryable": retryable,
            "changedState": changed,
        })),
    )
}

fn request_id(rec: &InflightRecord) -> Option<NumberOrString> {
    match &rec.request_id {
        Value::Number(n) => n.as_i64().map(NumberOrString::Number),
        Value::String(s) => Some(NumberOrString::String(s.as_str().into())),
        _ => None,
    }
}

/// The span of taking over work begun elsewhere (`takeover {what}`), linked to the trace of
/// the request that began it when that one was sampled (`traceparent`, stored with the work).
pub(crate) fn takeover_span(what: &str, dead: &Owner, traceparent: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "haven.takeover",
        otel.name = %format!("takeover {what}"),
        otel.kind = "internal",
        haven.dead_node = %dead.node,
    );
    haven_telemetry::trace::add_link(&span, traceparent);
    span
}

/// The call an in-flight record describes, if it is a tool call that may run again here.
async fn rerunnable_call(inner: &Arc<Inner>, rec: &InflightRecord) -> Option<(Call, String)> {
    if rec.method != "tools/call" {
        return None;
    }
    let Some(Value::Object(params)) = rec.params.clone() else {
        return None;
    };
    let name = params.get("name").and_then(Value::as_str)?.to_owned();
    let loaded = crate::session::load(&*inner.store, &rec.session)
        .await
        .ok()??;
    let progress_token = rec
        .progress_token
        .clone()
        .and_then(|t| serde_json::from_value(t).ok());
    let call = Call {
        id: request_id(rec)?,
        method: rec.method.clone(),
        params,
        era: Era::Legacy {
            session: rec.session.clone(),
            protocol_version: loaded.record.protocol_version.clone(),
        },
        caller: Arc::new(super::legacy::caller_of(&loaded.record)),
        progress_token,
        // Admitted by the rules when it first arrived.
        principal: None,
        traceparent: None,
        tracestate: None,
        trace: None,
    };
    let (tools, index) = inner.tools_for(&call).await.ok()?;
    let idempotent = index
        .get(&name)
        .and_then(|i| tools[*i].annotations.as_ref())
        .and_then(|a| a.idempotent_hint)
        .unwrap_or(false);
    idempotent.then_some((call, name))
}

/// Whether an interrupted request had changed state: known only for tools whose every write
/// goes through Haven's store.
fn changed_state(inner: &Inner, rec: &InflightRecord, owner: &Owner) -> Option<bool> {
    if rec.method != "tools/call" {
        return Some(owner.effects > 0);
    }
    let tool = rec
        .params
        .as_ref()
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    inner
        .catalog
        .tracks_effects(tool)
        .then_some(owner.effects > 0)
}

/// Takes over the stream of a request whose owner is gone: runs it again here when allowed
/// (an idempotent tool call of another node), otherwise ends it with the interrupted error.
async fn take_over_stream(inner: &Arc<Inner>, claim: Claim, session: &str, stream_id: &str) {
    let rec = match stream::inflight(&*inner.store, session, stream_id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "reading an interrupted request failed");
            return;
        }
    };
    let Some(rec) = rec else {
        // The request's final answer is stored but its ownership record was not closed (an
        // older version wrote no ownership records): close it.
        let _ = claim
            .settle(
                &*inner.store,
                Batch::new(),
                inner.config.region_lease.as_ref(),
            )
            .await;
        return;
    };
    let span = takeover_span(&rec.method, &claim.dead, rec.traceparent.as_deref());
    use tracing::Instrument as _;
    settle_stream(inner, claim, session, stream_id, rec)
        .instrument(span)
        .await;
}

/// [`take_over_stream`] once its in-flight record is read, in the takeover's span.
async fn settle_stream(
    inner: &Arc<Inner>,
    claim: Claim,
    session: &str,
    stream_id: &str,
    rec: InflightRecord,
) {
    let another_node = claim.dead.node != inner.config.node_id;
    if another_node && let Some((call, tool)) = rerunnable_call(inner, &rec).await {
        rerun(inner, claim, call, &tool, &rec).await;
        return;
    }
    let changed = changed_state(inner, &rec, &claim.dead);
    let msg = jsonrpc::error_response(request_id(&rec).as_ref(), &interrupted_error(changed));
    let batch = stream::append_batch(session, stream_id, &[(msg, true)]);
    let dead = claim.dead.clone();
    match claim
        .settle(&*inner.store, batch, inner.config.region_lease.as_ref())
        .await
    {
        Ok(_) => {
            if let Some(m) = haven_telemetry::get() {
                m.takeovers.inc();
                m.interrupted.inc();
            }
            tracing::info!(
            session, stream = stream_id, method = %rec.method, dead_node = %dead.node,
            epoch = dead.epoch, "ended the stream of an interrupted request"
            )
        }
        Err(ClaimError::Lost(_)) => {}
        Err(e) => tracing::warn!(error = %e, "could not end an interrupted stream"),
    }
}

/// Runs an interrupted idempotent tool call again into the same stream, under a claim that
/// makes this node its owner (the client's progress token goes with it).
async fn rerun(inner: &Arc<Inner>, claim: Claim, call: Call, tool: &str, rec: &InflightRecord) {
    let dead = claim.dead.clone();
    let key = claim.key.clone();
    inner.executions.begin(&key);
    let taken = claim
        .take(
            inner.store.clone(),
            &inner.config.node_id,
            &inner.config.boot_id,
            Batch::new(),
            inner.config.region_lease.as_ref(),
        )
        .await;
    let execution = match taken {
        Ok((e, _)) => e,
        Err(e) => {
            inner.executions.end(&key);
            if !matches!(e, ClaimError::Lost(_)) {
                tracing::warn!(error = %e, "could not claim an interrupted request");
            }
            return;
        }
    };
    if let Some(m) = haven_telemetry::get() {
        m.takeovers.inc();
    }
    tracing::info!(
        session = %rec.session, stream = %rec.stream, tool, dead_node = %dead.node,
        epoch = dead.epoch + 1, "running an interrupted idempotent tool call again"
    );
    let events = stream::read(&*inner.store, &rec.session, &rec.stream, 0, usize::MAX)
        .await
        .unwrap_or_default();
    let last = events.last().map_or(0, |e| e.index);
    // The run starts its progress from the beginning again: what it reports short of the
    // progress the client already had is not delivered (see `ProgressFloor::admits`).
    let progress = rec
        .progress_token
        .as_ref()
        .and_then(|t| super::legacy::ProgressFloor::of(t, &events));
    let fence = FencedStore::new(execution.clone());
    let running = inner.spawn_handler(call.clone(), Some(fence));
    let p = super::legacy::Pump {
        session: rec.session.clone(),
        stream: rec.stream.clone(),
        execution,
        next_index: last + 1,
        progress,
    };
    super::legacy::start_pump(inner, p, &call.id, running.rx, None, running.cancel);
}

/// Settles one execution whose owner is gone (or that nothing on this node runs any more).
async fn take_over(inner: &Arc<Inner>, claim: Claim) {
    if let Some((session, stream_id)) = stream::parse_owner_key(&claim.key) {
        let (session, stream_id) = (session.to_owned(), stream_id.to_owned());
        take_over_stream(inner, claim, &session, &stream_id).await;
    } else if let Some(task) = tasks::parse_owner_key(&claim.key) {
        let task = task.to_owned();
        tasks::adopt(inner, claim, &task).await;
    } else {
        tracing::warn!(key = %claim.key, "an ownership record of an unknown kind");
    }
}

/// Whether this node should settle the execution of `owner` now.
fn needs_settling(inner: &Inner, key: &str, owner: &Owner) -> bool {
    // Never while something here still runs it: ours, or an old run of this process that
    // lost it to another node and has not written since (it finds out at its next write and
    // ends). Settling it here meanwhile would write a tombstone with this node's origin, which
    // that old run's retried last write would take for its own.
    if owner.finished || inner.executions.contains(key) {
        return false;
    }
    if owner.node == inner.config.node_id && owner.boot == inner.config.boot_id {
        // Ours, and nothing here runs it any more.
        return true;
    }
    process_gone(inner, &owner.node, &owner.boot)
}

/// Whether the process `boot` of node `node` is gone. An embedded store is open in this
/// process alone: whoever else wrote to it (an earlier process, or another node whose
/// state this directory was restored from) is gone. On a shared store, the region's
/// membership says.
fn process_gone(inner: &Inner, node: &str, boot: &str) -> bool {
    if !inner.store.shared() {
        return node != inner.config.node_id || boot != inner.config.boot_id;
    }
    inner.membership.is_dead(node, boot)
}

/// Settles the execution `key` if its owner is gone; what a resumed stream calls when it
/// finds no more events.
pub(crate) async fn settle_if_orphaned(inner: &Arc<Inner>, key: &str) {
    if !recovery_open(inner) {
        return;
    }
    let Ok(Some(claim)) = Claim::read(&*inner.store, key).await else {
        return;
    };
    if needs_settling(inner, key, &claim.dead) {
        take_over(inner, claim).await;
    }
}

/// Scans every running execution and settles those whose owner is gone; ends standalone
/// streams of dead processes.
pub(crate) async fn recover(inner: &Arc<Inner>) -> Result<(), StoreError> {
    if !recovery_open(inner) {
        tracing::debug!("not settling others' work yet: waiting to hear every other region once");
        return Ok(());
    }
    let mut settled = 0usize;
    for r in inner.store.scan_all(OWNERS_NS, "").await? {
        if !haven_cluster::ownership::of_this_region(&*inner.store, &r) {
            continue;
        }
        let Some(owner) = Owner::decode(r.value()) else {
            continue;
        };
        let key = r.record.key.clone();
        if !needs_settling(inner, &key, &owner) {
            continue;
        }
        let claim = Claim {
            key,
            dead: owner,
            revision: r.revision,
        };
        take_over(inner, claim).await;
        settled += 1;
    }
    // Standalone GET streams have no ownership record: their in-flight record only says
    // which process served them.
    for r in inner.store.scan_all(INFLIGHT_NS, "").await? {
        let Ok(rec) = serde_json::from_slice::<InflightRecord>(r.value()) else {
            continue;
        };
        if rec.method == STANDALONE
            && haven_cluster::ownership::of_this_region(&*inner.store, &r)
            && process_gone(inner, &rec.node, &rec.boot)
        {
            let batch = Batch::new().delete_if(
                INFLIGHT_NS,
                &r.record.key,
                haven_state::Expect::Revision(r.revision),
            );
            if inner.store.commit(batch).await.is_ok() {
                settled += 1;
            }
        }
    }
    if settled > 0 {
        tracing::info!(settled, "settled work left by processes that are gone");
    }
    Ok(())
}

/// Deletes the in-flight records of the standalone GET streams this process served, at the
/// end of a clean stop: their clients were told to reconnect when draining began, so that
/// nothing is left for the next start (or another node) to settle as the work of a process
/// that is gone. Returns how many were deleted.
pub(crate) async fn release_standalone_streams(inner: &Arc<Inner>) -> Result<usize, StoreError> {
    let mut released = 0usize;
    for r in inner.store.scan_all(INFLIGHT_NS, "").await? {
        let Ok(rec) = serde_json::from_slice::<InflightRecord>(r.value()) else {
            continue;
        };
        if rec.method == STANDALONE
            && rec.node == inner.config.node_id
            && rec.boot == inner.config.boot_id
        {
            // Unconditional: the stream's producer may have renewed the record's time-to-live
            // meanwhile (a new revision), but a record names the process that opened it for
            // good.
            let batch = Batch::new().delete(INFLIGHT_NS, &r.record.key);
            match inner.store.commit(batch).await {
                Ok(_) => released += 1,
                Err(e) => tracing::warn!(error = %e, "could not release a standalone stream"),
            }
        }
    }
    Ok(released)
}

/// Whether this node may settle work left by others now (see `EngineConfig::recovery_gate`).
fn recovery_open(inner: &Inner) -> bool {
    inner.config.recovery_gate.as_ref().is_none_or(|g| (g.0)())
}

/// Takes over every running execution of region `region` held here (see
/// `Engine::take_over_region`).
pub(crate) async fn take_over_region(
    inner: &Arc<Inner>,
    region: &str,
    claimable_only: bool,
) -> Result<usize, StoreError> {
    let mut taken = 0usize;
    for r in inner.store.scan_all(OWNERS_NS, "").await? {
        if &*r.record.version.origin.region != region {
            continue;
        }
        let Some(owner) = Owner::decode(r.value()) else {
            continue;
        };
        if owner.finished || (claimable_only && !owner.claimable) {
            continue;
        }
        let claim = Claim {
            key: r.record.key.clone(),
            dead: owner,
            revision: r.revision,
        };
        take_over(inner, claim).await;
        taken += 1;
    }
    if claimable_only {
        tracing::warn!(
            region,
            taken,
            "took over the claimable work of a failed region"
        );
        return Ok(taken);
    }
    // Its standalone GET streams end too (their in-flight records only).
    for r in inner.store.scan_all(INFLIGHT_NS, "").await? {
        if &*r.record.version.origin.region != region {
            continue;
        }
        let Ok(rec) = serde_json::from_slice::<InflightRecord>(r.value()) else {
            continue;
        };
        if rec.method == STANDALONE {
            let batch = Batch::new().delete_if(
                INFLIGHT_NS,
                &r.record.key,
                haven_state::Expect::Revision(r.revision),
            );
            let _ = inner.store.commit(batch).await;
        }
    }
    tracing::warn!(region, taken, "took over the running work of a lost region");
    Ok(taken)
}
