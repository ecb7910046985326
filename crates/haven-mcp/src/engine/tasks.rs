//! Tasks: durable records of long tool calls, in both forms the protocol has had: the
//! `io.modelcontextprotocol/tasks` extension of 2026-07-28 (server-directed, polled with
//! `tasks/get`, answered with `tasks/update`) and the 2025-11-25 experimental form
//! (client-requested with `params.task`, results through `tasks/result`). A task is stored
//! before the response that announces it, and any node can serve it afterwards.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use haven_cluster::ownership::{self, End};
use haven_state::{Batch, Expect, StoreError};
use parking_lot::Mutex;
use rmcp::model::{
    CallToolResult, ErrorCode, ErrorData, JsonObject, ResultType, ServerResult, Task, TaskStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::dispatch::{Call, Outcome, finish, legacy_tasks};
use super::mrtr::{ask_client, missing_capabilities};
use super::{Inner, store_error};
use crate::catalog::{Caller, InputRequest, Round, Step};
use crate::context::{Era, Final, Item, Outbox, RequestContext, TaskHook};
use crate::hub::Topic;
use crate::jsonrpc::{self, invalid_params};

/// Namespace of task records.
pub const TASKS_NS: &str = "tasks";
/// Namespace of the per-session task index (for `tasks/list`).
pub const TASK_INDEX_NS: &str = "task-index";
/// Key of the ownership record of a task's run.
pub fn owner_key(task_id: &str) -> String {
    format!("t/{task_id}")
}

/// The task id of an ownership key made by [`owner_key`].
pub fn parse_owner_key(key: &str) -> Option<&str> {
    key.strip_prefix("t/")
}

/// How often a waiter re-reads a task without a change (in case one was missed).
const RECHECK: Duration = Duration::from_secs(2);
/// How often a task's runner re-reads it for a cancellation without a change.
const CANCEL_RECHECK: Duration = Duration::from_secs(5);

/// Extension id of the tasks extension.
pub const TASKS_EXTENSION: &str = "io.modelcontextprotocol/tasks";

/// Which protocol form a task follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskForm {
    /// The 2026-07-28 tasks extension.
    Extension,
    /// The 2025-11-25 experimental tasks.
    Experimental,
}

/// A task as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Task id (unguessable).
    pub task_id: String,
    /// Protocol form.
    pub form: TaskForm,
    /// Owning legacy session, if any.
    pub session: Option<String>,
    /// Protocol version of the request that created it.
    pub protocol_version: String,
    /// Tool it runs.
    pub tool: String,
    /// Tool arguments.
    pub arguments: JsonObject,
    /// Whether the tool may run again after an interruption.
    pub idempotent: bool,
    /// Who created it.
    pub caller: Caller,
    /// Status.
    pub status: TaskStatus,
    /// Human-readable status detail.
    pub status_message: Option<String>,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Last change, RFC 3339.
    pub last_updated_at: String,
    /// Time-to-live in milliseconds from creation.
    pub ttl_ms: u64,
    /// Suggested poll interval.
    pub poll_interval_ms: u64,
    /// Input requests awaiting an answer, by key (raw JSON requests).
    pub pending: BTreeMap<String, Value>,
    /// Answers collected for the current round.
    pub answers: BTreeMap<String, Value>,
    /// Round number of the handler.
    pub round: u32,
    /// Handler state for the next round.
    pub state: Option<Value>,
    /// Final result (JSON), once completed.
    pub result: Option<Value>,
    /// Final JSON-RPC error, once failed.
    pub error: Option<Value>,
    /// Whether another region may take the task over (it was created under this node's
    /// region lease): its end is shown only once a majority of regions holds it.
    #[serde(default)]
    pub claimable: bool,
    /// Node running it.
    pub owner_node: String,
    /// Process running it.
    pub owner_boot: String,
    /// The `traceparent` of the server span of the request that created it, when sampled: a
    /// node or region that adopts the task links its span to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// How many tasks of the store `node_id` runs (or ran last), by state in the order of
/// [`haven_telemetry::TaskState::ALL`] (working, input required, completed, failed,
/// cancelled): what `haven_tasks` shows. Reads the status and owner of each live task only.
pub async fn count_by_state(
    store: &dyn haven_state::Store,
    node_id: &str,
) -> Result<[u64; 5], haven_state::StoreError> {
    #[derive(serde::Deserialize)]
    struct Brief<'a> {
        status: TaskStatus,
        #[serde(borrow)]
        owner_node: std::borrow::Cow<'a, str>,
    }
    let mut counts = [0u64; 5];
    let mut after: Option<String> = None;
    loop {
        let page = store.scan(TASKS_NS, "", after.as_deref(), 512).await?;
        for r in &page.records {
            let Ok(t) = serde_json::from_slice::<Brief>(r.value()) else {
                continue;
            };
            if t.owner_node != node_id {
                continue;
            }
            let i = match t.status {
                TaskStatus::Working => 0,
                TaskStatus::InputRequired => 1,
                TaskStatus::Completed => 2,
                TaskStatus::Failed => 3,
                TaskStatus::Cancelled => 4,
                _ => continue,
            };
            counts[i] += 1;
        }
        match page.next_after {
            Some(a) => after = Some(a),
            None => return Ok(counts),
        }
    }
}

fn is_terminal(s: TaskStatus) -> bool {
    s.is_terminal()
}

/// RFC 3339 timestamp of a Unix-millisecond time.
pub fn rfc3339(millis: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl TaskRecord {
    /// The era of the requests of the task's form (the era its tool runs in).
    fn era(&self) -> Era {
        match self.form {
            TaskForm::Extension => Era::Stateless {
                protocol_version: self.protocol_version.clone(),
            },
            TaskForm::Experimental => Era::Legacy {
                session: self.session.clone().unwrap_or_default(),
                protocol_version: self.protocol_version.clone(),
            },
        }
    }

    fn base(&self) -> Task {
        let mut t = Task::new(
            self.task_id.clone(),
            self.status,
            self.created_at.clone(),
            self.last_updated_at.clone(),
        )
        .with_ttl_ms(self.ttl_ms)
        .with_poll_interval_ms(self.poll_interval_ms);
        if let Some(m) = &self.status_message {
            t = t.with_status_message(m.clone());
        }
        t
    }

    /// The task as the extension's `DetailedTask` (status-specific payload inlined).
    pub fn detailed_json(&self) -> Value {
        let mut v = serde_json::to_value(self.base()).expect("task serializes");
        match self.status {
            TaskStatus::InputRequired => {
                v["inputRequests"] = Value::Object(self.pending.clone().into_iter().collect())
            }
            TaskStatus::Completed => {
                v["result"] = self.result.clone().unwrap_or_else(|| serde_json::json!({}))
            }
            TaskStatus::Failed => {
                v["error"] = self.error.clone().unwrap_or_else(
                    || serde_json::json!({"code": -32603, "message": "Task failed"}),
                )
            }
            _ => {}
        }
        v
    }

    /// The task in the 2025-11-25 experimental shape.
    pub fn experimental_json(&self) -> Value {
        let mut v = serde_json::json!({
            "taskId": self.task_id,
            "status": self.status,
            "createdAt": self.created_at,
            "lastUpdatedAt": self.last_updated_at,
            "ttl": self.ttl_ms,
            "pollInterval": self.poll_interval_ms,
        });
        if let Some(m) = &self.status_message {
            v["statusMessage"] = m.clone().into();
        }
        v
    }
}

/// The -32021 error for task methods (or task-only tools) without the tasks extension.
pub(crate) fn tasks_capability_required() -> ErrorData {
    ErrorData::new(
        ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY,
        "Missing required client capability: the io.modelcontextprotocol/tasks extension",
        Some(serde_json::json!({
            "requiredCapabilities": { "extensions": { TASKS_EXTENSION: {} } }
        })),
    )
}

/// Loads a task.
pub(crate) async fn load(inner: &Inner, id: &str) -> Result<Option<(TaskRecord, u64)>, StoreError> {
    if id.is_empty() || id.len() > 200 {
        return Ok(None);
    }
    let Some(r) = inner.store.get(TASKS_NS, id).await? else {
        return Ok(None);
    };
    let rec: TaskRecord = serde_json::from_slice(r.value())
        .map_err(|e| StoreError::Corrupt(format!("task {id}: {e}")))?;
    Ok(Some((rec, r.revision)))
}

/// Changes a task with compare-and-set, retrying on concurrent updates. `change` returns
/// whether to write.
pub(crate) async fn update(
    inner: &Inner,
    id: &str,
    change: impl FnMut(&mut TaskRecord) -> Result<bool, ErrorData>,
) -> Result<Option<TaskRecord>, ErrorData> {
    update_as(inner, id, None, false, change).await
}

/// Like [`update`], written by the task's runner under its execution: the write lands only
/// while this node owns the task's run (`finish` closes the run with it).
pub(crate) async fn update_as(
    inner: &Inner,
    id: &str,
    execution: Option<&haven_cluster::Execution>,
    finish: bool,
    mut change: impl FnMut(&mut TaskRecord) -> Result<bool, ErrorData>,
) -> Result<Option<TaskRecord>, ErrorData> {
    for _ in 0..32 {
        let Some((mut rec, rev)) = load(inner, id).await.map_err(store_error)? else {
            return Ok(None);
        };
        if !change(&mut rec)? {
            if finish && let Some(e) = execution {
                // Nothing to change (e.g. cancelled meanwhile), but the run ends here.
                let _ = e.finish(Batch::new()).await;
            }
            return Ok(Some(rec));
        }
        rec.last_updated_at = rfc3339(inner.store.clock().wall_millis());
        let value = serde_json::to_vec(&rec).expect("task serializes");
        let mut batch = Batch::new().put_if(TASKS_NS, id, value, Expect::Revision(rev));
        if let haven_state::Op::Put { ttl_millis, .. } = &mut batch.ops[0] {
            *ttl_millis = Some(remaining_ttl(inner, &rec));
        }
        let written = match execution {
            None => inner.store.commit(batch).await.map(|_| ()),
            Some(e) => {
                let r = if finish {
                    e.finish(batch).await
                } else {
                    e.commit(batch, false).await
                };
                match r {
                    Ok(_) => Ok(()),
                    Err(haven_cluster::FenceError::Store(e)) => Err(e),
                    Err(haven_cluster::FenceError::Fenced { key, by }) => {
                        tracing::warn!(task = id, execution = %key, owner = %by, "this node lost a task it was running; it stops");
                        return Err(jsonrpc::internal(format!(
                            "task {id} is run by another node now"
                        )));
                    }
                }
            }
        };
        match written {
            Ok(()) => return Ok(Some(rec)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(store_error(e)),
        }
    }
    Err(jsonrpc::internal(format!(
        "task {id} is updated too often concurrently"
    )))
}

/// Like [`update_as`], retrying while the store is unavailable: what a run records about
/// itself (its outcome above all) is kept until it is stored or the run is lost, never
/// dropped by an outage (a dropped outcome would make the task run again, or fail a task
/// whose work was done).
async fn update_until_stored(
    inner: &Inner,
    id: &str,
    execution: &haven_cluster::Execution,
    finish: bool,
    mut change: impl FnMut(&mut TaskRecord) -> Result<bool, ErrorData>,
) -> Result<Option<TaskRecord>, ErrorData> {
    let mut delay = Duration::from_millis(20);
    let mut warned = false;
    loop {
        match update_as(inner, id, Some(execution), finish, &mut change).await {
            Err(e) if crate::outcome::is_store_unavailable(&e) => {
                if !warned {
                    tracing::warn!(task = id, error = %e.message, "recording a task's state failed; retrying until stored");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

fn created_millis(rec: &TaskRecord) -> u64 {
    time::OffsetDateTime::parse(
        &rec.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as u64)
    .unwrap_or(0)
}

fn remaining_ttl(inner: &Inner, rec: &TaskRecord) -> u64 {
    let now = inner.store.clock().wall_millis();
    (created_millis(rec) + rec.ttl_ms)
        .saturating_sub(now)
        .max(1)
}

/// The batch that creates a task record (and its session index entry).
fn create_batch(rec: &TaskRecord) -> Batch {
    let value = serde_json::to_vec(rec).expect("task serializes");
    let mut batch = Batch::new().put_if(TASKS_NS, &rec.task_id, value, Expect::Absent);
    if let haven_state::Op::Put { ttl_millis, .. } = &mut batch.ops[0] {
        *ttl_millis = Some(rec.ttl_ms);
    }
    if let Some(session) = &rec.session {
        batch = batch.put_ttl(
            TASK_INDEX_NS,
            &format!("{session}/{}", rec.task_id),
            Vec::new(),
            rec.ttl_ms,
        );
    }
    batch
}

/// Creates a task record durably, with the execution that runs it (owned by this node). With
/// a `fence`, the handler's writes go through that execution from now on.
async fn create(
    inner: &Inner,
    rec: &TaskRecord,
    fence: Option<&Arc<haven_cluster::FencedStore>>,
) -> Result<Arc<haven_cluster::Execution>, ErrorData> {
    if let Some(session) = &rec.session {
        // The session's tasks that have not expired, counted up to the limit.
        let max = inner.config.limits.max_tasks_per_session();
        let page = inner
            .store
            .scan(TASK_INDEX_NS, &format!("{session}/"), None, max)
            .await
            .map_err(store_error)?;
        if page.records.len() >= max {
            return Err(ErrorData::invalid_params(
                format!(
                    "Invalid params: a session holds at most {max} tasks that have not expired (setting limits.max_tasks_per_session; finished and cancelled ones count until they expire)"
                ),
                None,
            ));
        }
    }
    let key = owner_key(&rec.task_id);
    inner.executions.begin(&key);
    let owner = haven_cluster::Owner::new(&inner.config.node_id, &inner.config.boot_id);
    // Claimable only if the record says so (the execution cannot become claimable after
    // the record was written as not).
    let lease = inner
        .config
        .region_lease
        .clone()
        .filter(haven_cluster::RegionLease::holds);
    let mut rec = rec.clone();
    rec.claimable = lease.is_some();
    let store = inner.store.clone();
    let batch = create_batch(&rec);
    let opened = match fence {
        Some(f) => {
            f.attach(|effects| async move {
                let mut owner = owner;
                owner.effects = effects;
                haven_cluster::Execution::open_leased(store, &key, owner, batch, lease.as_ref())
                    .await
                    .map(|(e, _)| (e.clone(), e))
            })
            .await
        }
        None => haven_cluster::Execution::open_leased(store, &key, owner, batch, lease.as_ref())
            .await
            .map(|(e, _)| e),
    };
    opened.map_err(|e| {
        inner.executions.end(&owner_key(&rec.task_id));
        store_error(e)
    })
}

#[allow(clippy::too_many_arguments)]
fn new_record(
    inner: &Inner,
    call: &Call,
    form: TaskForm,
    tool: &str,
    arguments: &JsonObject,
    idempotent: bool,
    ttl: Option<u64>,
) -> TaskRecord {
    let now = inner.store.clock().wall_millis();
    let max = inner.config.task_ttl.as_millis() as u64;
    let (session, protocol_version) = match &call.era {
        Era::Legacy {
            session,
            protocol_version,
        } => (Some(session.clone()), protocol_version.clone()),
        Era::Stateless { protocol_version } => (None, protocol_version.clone()),
    };
    TaskRecord {
        task_id: format!("{:032x}", haven_state::ids::random_u128()),
        form,
        session,
        protocol_version,
        tool: tool.to_owned(),
        arguments: arguments.clone(),
        idempotent,
        caller: (*call.caller).clone(),
        status: TaskStatus::Working,
        status_message: None,
        created_at: rfc3339(now),
        last_updated_at: rfc3339(now),
        ttl_ms: ttl.unwrap_or(max).clamp(1, max),
        poll_interval_ms: inner.config.task_poll_interval.as_millis() as u64,
        pending: BTreeMap::new(),
        answers: BTreeMap::new(),
        round: 0,
        state: None,
        result: None,
        error: None,
        claimable: false,
        owner_node: inner.config.node_id.clone(),
        owner_boot: inner.config.boot_id.clone(),
        traceparent: call.trace.clone(),
    }
}

/// Turns a running tool call into a task when its handler asks (`become_task`).
pub(crate) struct Promoter {
    target: Option<PromoteTarget>,
    task_id: Mutex<Option<String>>,
    /// The execution of the task's run, once there is one.
    execution: Mutex<Option<Arc<haven_cluster::Execution>>>,
}

/// The tool call a promoter can make a task of.
pub(crate) struct PromoteTarget {
    pub(crate) inner: Arc<Inner>,
    pub(crate) call: Call,
    pub(crate) out: Outbox,
    pub(crate) tool: String,
    pub(crate) arguments: JsonObject,
    pub(crate) idempotent: bool,
    pub(crate) fence: Option<Arc<haven_cluster::FencedStore>>,
}

impl Promoter {
    /// A promoter for a tool call that may become a task.
    pub(crate) fn new(target: PromoteTarget) -> Arc<Promoter> {
        Arc::new(Promoter {
            target: Some(target),
            task_id: Mutex::new(None),
            execution: Mutex::new(None),
        })
    }

    /// A promoter that never promotes (prompts, resources, tools that cannot be tasks).
    pub(crate) fn disabled() -> Arc<Promoter> {
        static DISABLED: std::sync::LazyLock<Arc<Promoter>> = std::sync::LazyLock::new(|| {
            Arc::new(Promoter {
                target: None,
                task_id: Mutex::new(None),
                execution: Mutex::new(None),
            })
        });
        DISABLED.clone()
    }

    /// A promoter for a task that already exists, run under `execution`.
    fn promoted(task_id: String, execution: Arc<haven_cluster::Execution>) -> Arc<Promoter> {
        Arc::new(Promoter {
            target: None,
            task_id: Mutex::new(Some(task_id)),
            execution: Mutex::new(Some(execution)),
        })
    }

    fn execution(&self) -> Option<Arc<haven_cluster::Execution>> {
        self.execution.lock().clone()
    }

    /// Whether the request became a task.
    pub(crate) fn is_promoted(&self) -> bool {
        self.task_id.lock().is_some()
    }

    fn task_id(&self) -> Option<String> {
        self.task_id.lock().clone()
    }
}

#[async_trait::async_trait]
impl TaskHook for Promoter {
    async fn promote(&self) -> Result<bool, ErrorData> {
        if self.is_promoted() {
            return Ok(true);
        }
        let Some(t) = &self.target else {
            return Ok(false);
        };
        let rec = new_record(
            &t.inner,
            &t.call,
            TaskForm::Extension,
            &t.tool,
            &t.arguments,
            t.idempotent,
            None,
        );
        let execution = create(&t.inner, &rec, t.fence.as_ref()).await?;
        *self.execution.lock() = Some(execution);
        let created = rmcp::model::CreateTaskResult::new(rec.base());
        let _ = t.out.send(Item::Final(Final::result(jsonrpc::response(
            &t.call.id, &created,
        ))));
        *self.task_id.lock() = Some(rec.task_id);
        Ok(true)
    }

    fn is_task(&self) -> bool {
        self.is_promoted()
    }
}

/// Starts a client-requested (2025-11-25 experimental) task: stores it, answers with it, and
/// runs the tool in the background of this request.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_client_task(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: RequestContext,
    out: &Outbox,
    tool: String,
    arguments: JsonObject,
    ttl: Option<u64>,
    idempotent: bool,
) -> Outcome {
    let rec = new_record(
        inner,
        call,
        TaskForm::Experimental,
        &tool,
        &arguments,
        idempotent,
        ttl,
    );
    let execution = match create(inner, &rec, None).await {
        Ok(e) => e,
        Err(e) => return Outcome::Error(e),
    };
    let mut created = serde_json::json!({ "task": rec.experimental_json() });
    created["_meta"] = serde_json::json!({
        "io.modelcontextprotocol/model-immediate-response":
            format!("Started task {} for {}; poll tasks/get for its status.", rec.task_id, tool)
    });
    let _ = out.send(Item::Final(Final::result(jsonrpc::response(
        &call.id, &created,
    ))));
    let hook = Promoter::promoted(rec.task_id.clone(), execution.clone());
    // The tool runs under the task's execution now, not the request's (which just ended).
    let ctx = ctx
        .with_fence(haven_cluster::FencedStore::new(execution))
        .with_task_hook(hook.clone());
    // The tool runs here until its first step: a cancellation, or the record's expiry,
    // stops it meanwhile too.
    watch_cancel(inner, &rec.task_id, ctx.cancelled().clone());
    let step = inner
        .catalog
        .call_tool(&ctx, &tool, arguments, Round::default())
        .await;
    run_task(inner, &hook, ctx, step).await;
    Outcome::Sent
}

/// Cancels `token` when the task is cancelled (by `tasks/cancel` on any node) or its record
/// expires.
fn watch_cancel(inner: &Arc<Inner>, task_id: &str, token: CancellationToken) {
    let inner2 = inner.clone();
    let task_id = task_id.to_owned();
    inner.spawn(async move {
        let (inner, task_id, token) = (&inner2, &task_id, &token);
        let check = move |(), _| async move {
            match load(inner, task_id).await {
                Ok(Some((rec, _))) if rec.status == TaskStatus::Cancelled => {
                    token.cancel();
                    ControlFlow::Break(())
                }
                Ok(Some((rec, _))) if is_terminal(rec.status) => ControlFlow::Break(()),
                // The record expired (or was removed) while the task ran: nobody can poll or
                // cancel it any more, so its handler stops rather than run on unseen.
                Ok(None) => {
                    tracing::info!(task = %task_id, "stopping a task whose record expired");
                    token.cancel();
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        };
        let topics = [Topic::key(TASKS_NS, task_id)];
        let _ = inner
            .hub
            .wait_until(&topics, CANCEL_RECHECK, token.cancelled(), (), check)
            .await;
    });
}

/// Runs a task from the step its handler just produced until the task is terminal. Every
/// write of the run goes through its execution: a node that lost the task stops.
pub(crate) async fn run_task(
    inner: &Arc<Inner>,
    hook: &Promoter,
    ctx: RequestContext,
    step: Result<Step<CallToolResult>, ErrorData>,
) {
    let (Some(task_id), Some(execution)) = (hook.task_id(), hook.execution()) else {
        return;
    };
    let cancel = ctx.cancelled().clone();
    watch_cancel(inner, &task_id, cancel.clone());
    {
        // Losing the run (another node took it over) stops the handler.
        let lost = execution.lost().clone();
        let cancel = cancel.clone();
        inner.spawn(async move {
            tokio::select! {
                () = lost.cancelled() => cancel.cancel(),
                () = cancel.cancelled() => {}
            }
        });
    }
    drive_task(inner, &task_id, &execution, ctx.detached(), step, &cancel).await;
    inner.executions.end(execution.key());
}

async fn drive_task(
    inner: &Arc<Inner>,
    task_id: &str,
    execution: &haven_cluster::Execution,
    ctx: RequestContext,
    mut step: Result<Step<CallToolResult>, ErrorData>,
    cancel: &CancellationToken,
) {
    loop {
        let (requests, state) = match step {
            Ok(Step::Done(result)) => {
                return finish_task(inner, task_id, execution, Ok(result), cancel).await;
            }
            Err(e) => return finish_task(inner, task_id, execution, Err(e), cancel).await,
            Ok(Step::NeedInput { requests, state }) => (requests, state),
        };
        let Some(round) =
            wait_for_answers(inner, task_id, execution, &ctx, requests, state, cancel).await
        else {
            return;
        };
        let Some((rec, _)) = load(inner, task_id).await.ok().flatten() else {
            return;
        };
        step = inner
            .catalog
            .call_tool(&ctx, &rec.tool, rec.arguments.clone(), round)
            .await;
    }
}

/// Puts the task into `input_required` and waits until every request is answered. Returns
/// the next round, or `None` when the task ended meanwhile (cancelled, expired).
async fn wait_for_answers(
    inner: &Arc<Inner>,
    task_id: &str,
    execution: &haven_cluster::Execution,
    ctx: &RequestContext,
    requests: BTreeMap<String, InputRequest>,
    state: Option<Value>,
    cancel: &CancellationToken,
) -> Option<Round> {
    if let Some(e) = missing_capabilities(&requests, ctx) {
        finish_task(inner, task_id, execution, Err(e), cancel).await;
        return None;
    }
    let pending: BTreeMap<String, Value> = requests
        .iter()
        .map(|(k, r)| (k.clone(), r.to_json()))
        .collect();
    let set = update_until_stored(inner, task_id, execution, false, |rec| {
        if is_terminal(rec.status) {
            return Ok(false);
        }
        rec.status = TaskStatus::InputRequired;
        rec.pending = pending.clone();
        rec.answers.clear();
        rec.state = state.clone();
        rec.round += 1;
        Ok(true)
    })
    .await;
    if !matches!(set, Ok(Some(ref r)) if r.status == TaskStatus::InputRequired) {
        return None;
    }
    wait_until_answered(inner, task_id, execution, cancel).await
}

/// Waits for `tasks/update` (or `tasks/result` answers) to fill every pending request, then
/// moves the task back to working and returns the round to run.
pub(crate) async fn wait_until_answered(
    inner: &Arc<Inner>,
    task_id: &str,
    execution: &haven_cluster::Execution,
    cancel: &CancellationToken,
) -> Option<Round> {
    let check = move |(), _| async move {
        let Some((rec, _)) = load(inner, task_id).await.ok().flatten() else {
            return ControlFlow::Break(None);
        };
        if is_terminal(rec.status) {
            return ControlFlow::Break(None);
        }
        if rec.status != TaskStatus::InputRequired || !rec.pending.is_empty() {
            return ControlFlow::Continue(());
        }
        let round = Round {
            input_responses: rec.answers.clone(),
            state: rec.state.clone(),
            number: rec.round,
        };
        let working = update_until_stored(inner, task_id, execution, false, |r| {
            if r.status != TaskStatus::InputRequired {
                return Ok(false);
            }
            r.status = TaskStatus::Working;
            r.answers.clear();
            Ok(true)
        })
        .await;
        ControlFlow::Break(working.ok().map(|_| round))
    };
    let topics = [Topic::key(TASKS_NS, task_id)];
    inner
        .hub
        .wait_until(&topics, RECHECK, cancel.cancelled(), (), check)
        .await
        .unwrap_or(None)
}

/// Records a task's outcome. A cancelled task stays cancelled.
async fn finish_task(
    inner: &Arc<Inner>,
    task_id: &str,
    execution: &haven_cluster::Execution,
    outcome: Result<CallToolResult, ErrorData>,
    cancel: &CancellationToken,
) {
    let r = update_until_stored(inner, task_id, execution, true, |rec| {
        if is_terminal(rec.status) {
            return Ok(false);
        }
        rec.pending.clear();
        match &outcome {
            _ if cancel.is_cancelled() => {
                rec.status = TaskStatus::Cancelled;
                rec.status_message = Some("The task was cancelled.".into());
            }
            Ok(result) => {
                let era = rec.era();
                let is_error = result.is_error == Some(true);
                rec.result = Some(finish(
                    inner,
                    &era,
                    ServerResult::CallToolResult(result.clone()),
                ));
                // The experimental form reports tool errors as a failed task; the extension as a
                // completed task whose result has isError.
                rec.status = if is_error && rec.form == TaskForm::Experimental {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Completed
                };
            }
            Err(e) => {
                rec.status = TaskStatus::Failed;
                rec.status_message = Some(e.message.to_string());
                rec.error = Some(serde_json::to_value(e).expect("errors serialize"));
            }
        }
        Ok(true)
    })
    .await;
    if let Err(e) = r {
        tracing::error!(task = task_id, error = %e.message, "recording the task's outcome failed");
    }
}

fn task_id_param(call: &Call) -> Result<String, ErrorData> {
    call.params
        .get("taskId")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| invalid_params("Invalid params: taskId (string) is required"))
}

fn not_found(id: &str) -> ErrorData {
    invalid_params(format!("Failed to retrieve task: Task not found: {id}"))
}

/// Loads a task the caller may see: stateless callers see extension tasks; a legacy session
/// sees its own experimental tasks; and only the principal that created a task sees it.
async fn visible(inner: &Inner, call: &Call, id: &str) -> Result<TaskRecord, ErrorData> {
    let found = match load(inner, id).await.map_err(store_error)? {
        Some(found) => Some(found),
        None => super::look_again(inner, &format!("Task {id}"), || load(inner, id))
            .await
            .map_err(|(message, e)| crate::outcome::store_failure(message, &e))?,
    };
    let Some((mut rec, revision)) = found else {
        return Err(not_found(id));
    };
    let ok = match &call.era {
        Era::Stateless { .. } => rec.form == TaskForm::Extension,
        Era::Legacy { session, .. } => rec.session.as_deref() == Some(session.as_str()),
    };
    // A task belongs to the principal that created it: to any other it does not exist.
    if !ok || rec.caller.principal != call.caller.principal {
        return Err(not_found(id));
    }
    if rec.claimable && is_terminal(rec.status) && !outcome_confirmed(inner, id, revision).await {
        // This region wrote the end, and a majority of regions does not hold it yet:
        // another region taking this one's work over might not have it, so it is not the
        // task's end until then.
        rec.status = TaskStatus::Working;
        rec.status_message =
            Some("Finishing: waiting until a majority of regions holds the outcome.".into());
        rec.result = None;
        rec.error = None;
    }
    Ok(rec)
}

/// Whether the task record `id` at `revision` may be shown as it is: it was written in
/// another region, or this node has no region lease (fewer than three regions), or a
/// majority of regions holds this region's log up to it.
async fn outcome_confirmed(inner: &Inner, id: &str, revision: u64) -> bool {
    let Some(lease) = &inner.config.region_lease else {
        return true;
    };
    let here = inner.store.origin().region.clone();
    match inner.store.get(TASKS_NS, id).await {
        // Changed since it was loaded (a claimer's record merged in): look again later.
        Ok(Some(r)) if r.revision != revision => false,
        Ok(Some(r)) if r.record.version.origin.region == here => {
            // Confirmed, and no run owns the task now (another region that took it over
            // meanwhile has its claim here by the time the others echo this region again;
            // its run's record supersedes this one when it writes).
            lease.confirmed(&*inner.store, revision).await
                && matches!(
                    ownership::end_of(&*inner.store, &owner_key(id)).await,
                    Ok(End::Never | End::By(_))
                )
        }
        _ => true,
    }
}

fn gate(call: &Call) -> Result<(), ErrorData> {
    if call.era.is_stateless() && !call.caller.capabilities.supports_tasks() {
        return Err(tasks_capability_required());
    }
    if !call.era.is_stateless() && !legacy_tasks(&call.era) {
        return Err(jsonrpc::method_not_found(&call.method));
    }
    Ok(())
}

/// `tasks/get`.
pub(crate) async fn get(inner: &Arc<Inner>, call: &Call) -> Result<Value, ErrorData> {
    gate(call)?;
    let id = task_id_param(call)?;
    let rec = visible(inner, call, &id).await?;
    Ok(match rec.form {
        TaskForm::Extension => {
            let mut v = rec.detailed_json();
            v["resultType"] = serde_json::to_value(ResultType::COMPLETE).expect("serializes");
            v
        }
        TaskForm::Experimental => rec.experimental_json(),
    })
}

/// `tasks/cancel`.
pub(crate) async fn cancel(inner: &Arc<Inner>, call: &Call) -> Result<Value, ErrorData> {
    gate(call)?;
    let id = task_id_param(call)?;
    let rec = visible(inner, call, &id).await?;
    if is_terminal(rec.status) {
        return match rec.form {
            TaskForm::Extension => Ok(ack()),
            TaskForm::Experimental => Err(invalid_params(format!(
                "Task {id} is already {}; only a running task can be cancelled",
                serde_json::to_value(rec.status)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or("finished")
            ))),
        };
    }
    if let Some(lease) = &inner.config.region_lease
        && !lease.holds()
        && haven_cluster::ownership::current(&*inner.store, &owner_key(&id))
            .await
            .ok()
            .flatten()
            .is_some_and(|(o, _)| o.claimable)
    {
        return Err(ErrorData::new(
            ErrorCode(-32000),
            format!(
                "Task {id} cannot be cancelled now: this region does not hear a majority of regions, and another region may be taking the task over. Try again, or in another region."
            ),
            Some(serde_json::json!({ "retryable": true })),
        ));
    }
    let updated = update(inner, &id, |r| {
        if is_terminal(r.status) {
            return Ok(false);
        }
        r.status = TaskStatus::Cancelled;
        r.status_message = Some("The task was cancelled by request.".into());
        r.pending.clear();
        Ok(true)
    })
    .await?
    .ok_or_else(|| not_found(&id))?;
    Ok(match updated.form {
        TaskForm::Extension => ack(),
        TaskForm::Experimental => updated.experimental_json(),
    })
}

fn ack() -> Value {
    serde_json::to_value(rmcp::model::TaskAckResult::new()).expect("serializes")
}

/// Records answers to a task's pending input requests; unknown keys are ignored.
pub(crate) async fn answer(
    inner: &Inner,
    id: &str,
    answers: &BTreeMap<String, Value>,
) -> Result<(), ErrorData> {
    update(inner, id, |r| {
        let mut changed = false;
        for (k, v) in answers {
            if r.pending.remove(k).is_some() {
                r.answers.insert(k.clone(), v.clone());
                changed = true;
            }
        }
        Ok(changed)
    })
    .await
    .map(|_| ())
}

/// `tasks/update` (extension): answers input requests.
pub(crate) async fn update_method(inner: &Arc<Inner>, call: &Call) -> Result<Value, ErrorData> {
    gate(call)?;
    let id = task_id_param(call)?;
    let responses: BTreeMap<String, Value> = match call.params.get("inputResponses") {
        Some(Value::Object(m)) => m.clone().into_iter().collect(),
        None | Some(Value::Null) => BTreeMap::new(),
        Some(_) => {
            return Err(invalid_params(
                "Invalid params: inputResponses must be an object",
            ));
        }
    };
    visible(inner, call, &id).await?;
    answer(inner, &id, &responses).await?;
    Ok(ack())
}

pub(crate) use update_method as update_request;

/// `tasks/list` (experimental form): the session's tasks.
pub(crate) async fn list(inner: &Arc<Inner>, call: &Call) -> Result<Value, ErrorData> {
    gate(call)?;
    let session = call.era.session().unwrap_or_default();
    let ids: Vec<String> = inner
        .store
        .scan_all(TASK_INDEX_NS, &format!("{session}/"))
        .await
        .map_err(store_error)?
        .iter()
        .filter_map(|r| r.record.key.rsplit('/').next().map(str::to_owned))
        .collect();
    let mut tasks = Vec::new();
    for id in ids {
        if let Some((rec, _)) = load(inner, &id).await.map_err(store_error)? {
            tasks.push(rec);
        }
    }
    tasks.sort_by(|a, b| b.created_at.cmp(&a.created_at));
    let all: Vec<Value> = tasks.iter().map(TaskRecord::experimental_json).collect();
    let (page, next) = super::dispatch::paginate(inner, Some(&call.params), all)?;
    let mut v = serde_json::json!({ "tasks": page });
    if let Some(n) = next {
        v["nextCursor"] = n.into();
    }
    Ok(v)
}

/// `tasks/result` (experimental form): waits for the task to end, delivering its input
/// requests to the client on the way, and returns what the tool call would have returned.
pub(crate) async fn result(
    inner: &Arc<Inner>,
    call: &Call,
    out: &Outbox,
    cancel: &CancellationToken,
) -> Result<Value, ErrorData> {
    gate(call)?;
    let id = task_id_param(call)?;
    visible(inner, call, &id).await?;
    let id = &id;
    let check = move |(), _| async move {
        match task_outcome(inner, call, id, out, cancel).await {
            Ok(None) => ControlFlow::Continue(()),
            Ok(Some(v)) => ControlFlow::Break(Ok(v)),
            Err(e) => ControlFlow::Break(Err(e)),
        }
    };
    let topics = [Topic::key(TASKS_NS, id)];
    inner
        .hub
        .wait_until(&topics, RECHECK, cancel.cancelled(), (), check)
        .await
        .unwrap_or_else(|()| Err(jsonrpc::internal("Request cancelled")))
}

/// What `tasks/result` answers for the task as it is now: the result or error of an ended
/// task, or `None` while it runs. Input requests the task waits for are asked of the client
/// first, and their answers recorded.
async fn task_outcome(
    inner: &Arc<Inner>,
    call: &Call,
    id: &str,
    out: &Outbox,
    cancel: &CancellationToken,
) -> Result<Option<Value>, ErrorData> {
    let session = call.era.session().unwrap_or_default();
    loop {
        let rec = visible(inner, call, id).await?;
        let related =
            serde_json::json!({ "io.modelcontextprotocol/related-task": { "taskId": id } });
        match rec.status {
            TaskStatus::Completed | TaskStatus::Failed if rec.result.is_some() => {
                let mut v = rec.result.clone().unwrap_or_default();
                v["_meta"] = related;
                return Ok(Some(v));
            }
            TaskStatus::Failed => {
                let mut e: ErrorData = rec
                    .error
                    .and_then(|e| serde_json::from_value(e).ok())
                    .unwrap_or_else(|| jsonrpc::internal("Task failed"));
                e.data = Some(related);
                return Err(e);
            }
            TaskStatus::Cancelled => {
                return Err(ErrorData::new(
                    ErrorCode(-32000),
                    "Task cancelled",
                    Some(related),
                ));
            }
            TaskStatus::InputRequired if !rec.pending.is_empty() => {
                let requests: BTreeMap<String, InputRequest> = rec
                    .pending
                    .iter()
                    .map(|(k, v)| {
                        let method = v.get("method").and_then(Value::as_str).unwrap_or_default();
                        (
                            k.clone(),
                            InputRequest {
                                method: method.to_owned(),
                                params: v.get("params").cloned(),
                            },
                        )
                    })
                    .collect();
                let answers = ask_client(inner, session, out, cancel, &requests, Some(id)).await?;
                answer(inner, id, &answers).await?;
            }
            _ => return Ok(None),
        }
    }
}

/// Picks up a task whose run's owner is gone, under `claim` (at most one node wins it):
/// re-runs an idempotent tool, keeps waiting for input on an input-required task, and fails
/// any other.
// Long by design: one claim's takeover from reading the task to running it again, kept whole
// because every step is fenced by the same claim.
pub(crate) async fn adopt(inner: &Arc<Inner>, claim: haven_cluster::Claim, task_id: &str) {
    let (rec, rev) = match load(inner, task_id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            // The task expired or never got stored: close its run.
            let _ = claim
                .settle(
                    &*inner.store,
                    Batch::new(),
                    inner.config.region_lease.as_ref(),
                )
                .await;
            return;
        }
        Err(e) => {
            tracing::warn!(task = task_id, error = %e, "reading an interrupted task failed");
            return;
        }
    };
    if is_terminal(rec.status) {
        let _ = claim
            .settle(
                &*inner.store,
                Batch::new(),
                inner.config.region_lease.as_ref(),
            )
            .await;
        return;
    }
    let span = super::recovery::takeover_span("task", &claim.dead, rec.traceparent.as_deref());
    use tracing::Instrument as _;
    adopt_live(inner, claim, task_id, rec, rev)
        .instrument(span)
        .await;
}

/// [`adopt`] of a task that has not ended, in the takeover's span.
async fn adopt_live(
    inner: &Arc<Inner>,
    claim: haven_cluster::Claim,
    task_id: &str,
    rec: TaskRecord,
    rev: u64,
) {
    let me = (&inner.config.node_id, &inner.config.boot_id);
    if is_terminal(rec.status) {
        let _ = claim
            .settle(
                &*inner.store,
                Batch::new(),
                inner.config.region_lease.as_ref(),
            )
            .await;
        return;
    }
    let resumable = rec.status == TaskStatus::InputRequired || rec.idempotent;
    let mut next = rec.clone();
    next.owner_node = me.0.clone();
    next.owner_boot = me.1.clone();
    next.last_updated_at = rfc3339(inner.store.clock().wall_millis());
    if !resumable {
        next.status = TaskStatus::Failed;
        next.status_message =
            Some("The task was interrupted because the node running it stopped.".into());
        next.error = Some(serde_json::json!({
            "code": -32603,
            "message": "The task was interrupted because the node running it stopped; the call may be retried."
        }));
    }
    let mut batch = Batch::new().put_if(
        TASKS_NS,
        task_id,
        serde_json::to_vec(&next).expect("task serializes"),
        Expect::Revision(rev),
    );
    if let haven_state::Op::Put { ttl_millis, .. } = &mut batch.ops[0] {
        *ttl_millis = Some(remaining_ttl(inner, &next));
    }
    if !resumable {
        match claim
            .settle(&*inner.store, batch, inner.config.region_lease.as_ref())
            .await
        {
            Ok(_) => tracing::info!(task = task_id, "failed an interrupted task"),
            Err(haven_cluster::ClaimError::Lost(_)) => {}
            Err(e) => {
                tracing::warn!(task = task_id, error = %e, "could not fail an interrupted task")
            }
        }
        return;
    }
    let key = claim.key.clone();
    inner.executions.begin(&key);
    let execution = match claim
        .take(
            inner.store.clone(),
            me.0,
            me.1,
            batch,
            inner.config.region_lease.as_ref(),
        )
        .await
    {
        Ok((e, _)) => e,
        Err(e) => {
            inner.executions.end(&key);
            if !matches!(e, haven_cluster::ClaimError::Lost(_)) {
                tracing::warn!(task = task_id, error = %e, "could not take over an interrupted task");
            }
            return;
        }
    };
    let inner2 = inner.clone();
    let rec = next;
    let span = tracing::Span::current();
    inner.spawn(tracing::Instrument::instrument(
        async move {
            let inner = inner2;
            let era = rec.era();
            let cancel = CancellationToken::new();
            let hook = Promoter::promoted(rec.task_id.clone(), execution.clone());
            let ctx = RequestContext::new(
                inner.store.clone(),
                era,
                rec.caller.clone(),
                None,
                None,
                cancel.clone(),
            )
            .with_fence(haven_cluster::FencedStore::new(execution.clone()))
            .with_task_hook(hook.clone());
            // A cancellation or the record's expiry stops the run from here on.
            watch_cancel(&inner, &rec.task_id, cancel.clone());
            let round = if rec.status == TaskStatus::InputRequired {
                match wait_until_answered(&inner, &rec.task_id, &execution, &cancel).await {
                    Some(r) => r,
                    None => {
                        inner.executions.end(execution.key());
                        return;
                    }
                }
            } else {
                Round {
                    input_responses: rec.answers.clone(),
                    state: rec.state.clone(),
                    number: rec.round,
                }
            };
            let step = inner
                .catalog
                .call_tool(&ctx, &rec.tool, rec.arguments.clone(), round)
                .await;
            run_task(&inner, &hook, ctx, step).await;
            tracing::info!(task = %rec.task_id, "resumed task finished");
        },
        span,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339(1_785_240_000_123);
        assert!(t.starts_with("2026-07-28T"), "{t}");
        assert!(t.ends_with('Z'));
    }
}
