//! Multi-round requests: a handler that needs client input is called again with the answers.
//! Legacy sessions get real server-to-client requests on the request's stream; stateless
//! clients get an input-required result whose `requestState` is sealed with the keyring.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{ErrorCode, ErrorData, InputResponses, NumberOrString, RequestId, SealOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::dispatch::Call;
use super::tasks::Promoter;
use super::{Inner, store_error};
use crate::catalog::{InputRequest, Round, Step};
use crate::context::{Item, Outbox, RequestContext};
use crate::hub::Topic;
use crate::jsonrpc::{self, invalid_params};

/// Namespace of client replies to server-to-client requests.
pub const REPLIES_NS: &str = "replies";
/// Most rounds one request may take.
const MAX_ROUNDS: u32 = 32;
/// How often a request waiting for a client's reply re-reads it without a change.
const RECHECK: Duration = Duration::from_secs(2);

/// How a multi-round request ended.
pub(crate) enum Driven<T> {
    /// The handler finished.
    Done(T),
    /// A stateless client must answer input requests (the serialized result).
    InputRequired(Value),
    /// The handler (or the client) failed the request.
    Error(ErrorData),
    /// The handler turned the request into a task; the task runner takes this step on.
    Promoted(Result<Step<T>, ErrorData>),
}

#[derive(Serialize, Deserialize)]
struct SealedState {
    /// Round the state was issued in.
    r: u32,
    /// The handler's state.
    s: Option<Value>,
}

/// What a sealed `requestState` is bound to (its associated data): the method, the tool or
/// prompt name, the principal that made the request, and the request's arguments. A state
/// replayed by another principal, or with other arguments, fails the integrity check.
fn binding(call: &Call, name: &str) -> Vec<u8> {
    let mut b = format!(
        "{}\u{0}{}\u{0}{}\u{0}",
        call.method,
        name,
        call.caller.principal.as_deref().unwrap_or("")
    )
    .into_bytes();
    // serde_json's maps are ordered by key, so equal arguments give equal bytes.
    if let Some(args) = call.params.get("arguments") {
        b.extend_from_slice(args.to_string().as_bytes());
    }
    b
}

/// The first round of a request: empty for legacy; from `inputResponses` and a verified
/// `requestState` for stateless requests.
pub(crate) fn first_round(
    inner: &Inner,
    call: &Call,
    name: &str,
    input_responses: Option<InputResponses>,
    request_state: Option<&str>,
) -> Result<Round, ErrorData> {
    if !call.era.is_stateless() {
        return Ok(Round::default());
    }
    let mut round = Round::default();
    if let Some(sealed) = request_state {
        let codec = inner
            .keyring
            .codec()
            .ok_or_else(|| jsonrpc::internal("no request-state key is available"))?;
        let opened: SealedState = codec
            .open_json_with(sealed, &binding(call, name))
            .map_err(|_| invalid_params("Invalid requestState: integrity check failed"))?;
        round.number = opened.r + 1;
        round.state = opened.s;
    } else if input_responses.is_some() {
        round.number = 1;
    }
    round.input_responses = input_responses.unwrap_or_default();
    Ok(round)
}

/// The -32021 error for input requests the client cannot answer.
pub(crate) fn missing_capabilities(
    requests: &BTreeMap<String, InputRequest>,
    ctx: &RequestContext,
) -> Option<ErrorData> {
    let mut missing = serde_json::Map::new();
    for r in requests.values() {
        if let Some(cap) = r.required_capability()
            && !ctx.client_supports(cap)
        {
            missing.insert(cap.to_owned(), serde_json::json!({}));
        }
    }
    (!missing.is_empty()).then(|| {
        ErrorData::new(
            ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY,
            "Missing required client capability",
            Some(serde_json::json!({ "requiredCapabilities": missing })),
        )
    })
}

/// Runs a handler round after round until it is done, fails, needs stateless input, or becomes
/// a task.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn drive<T, F, Fut>(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: &RequestContext,
    out: &Outbox,
    cancel: &CancellationToken,
    name: &str,
    mut round: Round,
    hook: &Promoter,
    step_fn: F,
) -> Driven<T>
where
    F: Fn(RequestContext, Round) -> Fut,
    Fut: Future<Output = Result<Step<T>, ErrorData>>,
{
    loop {
        let step = step_fn(ctx.clone(), round.clone()).await;
        if hook.is_promoted() {
            return Driven::Promoted(step);
        }
        let (requests, state) = match step {
            Ok(Step::Done(t)) => return Driven::Done(t),
            Err(e) => return Driven::Error(e),
            Ok(Step::NeedInput { requests, state }) => (requests, state),
        };
        if round.number >= MAX_ROUNDS {
            return Driven::Error(jsonrpc::internal(format!(
                "{name} asked for client input more than {MAX_ROUNDS} times"
            )));
        }
        if let Some(e) = missing_capabilities(&requests, ctx) {
            return Driven::Error(e);
        }
        if call.era.is_stateless() {
            return match input_required(inner, call, name, round.number, &requests, state) {
                Ok(v) => Driven::InputRequired(v),
                Err(e) => Driven::Error(e),
            };
        }
        let session = call.era.session().unwrap_or_default().to_owned();
        match ask_client(inner, &session, out, cancel, &requests, None).await {
            Ok(responses) => {
                round = Round {
                    input_responses: responses,
                    state,
                    number: round.number + 1,
                };
            }
            Err(e) => return Driven::Error(e),
        }
    }
}

/// The serialized input-required result of a stateless request.
fn input_required(
    inner: &Inner,
    call: &Call,
    name: &str,
    round: u32,
    requests: &BTreeMap<String, InputRequest>,
    state: Option<Value>,
) -> Result<Value, ErrorData> {
    let codec = inner
        .keyring
        .codec()
        .ok_or_else(|| jsonrpc::internal("no request-state key is available"))?;
    let binding = binding(call, name);
    let sealed = codec
        .seal_json_with(
            &SealedState { r: round, s: state },
            &SealOptions::new()
                .associated_data(&binding)
                .ttl(inner.config.request_state_ttl),
        )
        .map_err(|e| jsonrpc::internal(format!("sealing request state failed: {e}")))?;
    let input_requests: serde_json::Map<String, Value> = requests
        .iter()
        .map(|(k, r)| (k.clone(), r.to_json()))
        .collect();
    Ok(serde_json::json!({
        "resultType": "input_required",
        "inputRequests": input_requests,
        "requestState": sealed,
    }))
}

/// Key of a reply record.
pub(crate) fn reply_key(session: &str, id: &RequestId) -> String {
    format!("{session}/{id}")
}

/// Sends `requests` to a legacy client as server-to-client requests on the request's stream
/// and waits for every answer (stored by whichever node the client posts it to).
pub(crate) async fn ask_client(
    inner: &Arc<Inner>,
    session: &str,
    out: &Outbox,
    cancel: &CancellationToken,
    requests: &BTreeMap<String, InputRequest>,
    related_task: Option<&str>,
) -> Result<BTreeMap<String, Value>, ErrorData> {
    let mut pending = Vec::new();
    for (key, req) in requests {
        let id = RequestId::String(format!("haven-{:016x}", haven_state::ids::random_u64()).into());
        let mut params = req.params.clone().unwrap_or_else(|| serde_json::json!({}));
        if let (Some(task), Some(obj)) = (related_task, params.as_object_mut()) {
            let meta = obj.entry("_meta").or_insert_with(|| serde_json::json!({}));
            meta["io.modelcontextprotocol/related-task"] = serde_json::json!({ "taskId": task });
        }
        let params = (req.params.is_some() || related_task.is_some()).then_some(params);
        if out
            .send(Item::Request(jsonrpc::request(&id, &req.method, params)))
            .is_err()
        {
            return Err(jsonrpc::internal("the request's stream is gone"));
        }
        pending.push((key.as_str(), reply_key(session, &id)));
    }
    let deadline = tokio::time::Instant::now() + inner.config.client_reply_timeout;
    let mut responses = BTreeMap::new();
    for (key, rkey) in pending {
        let stop = async {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => jsonrpc::internal(format!(
                    "The client did not answer the {key} request within {:?}",
                    inner.config.client_reply_timeout
                )),
                () = cancel.cancelled() => jsonrpc::internal("Request cancelled"),
            }
        };
        let rkey = rkey.as_str();
        let check = move |(), _| async move {
            match inner.store.get(REPLIES_NS, rkey).await {
                Ok(None) => ControlFlow::Continue(()),
                Ok(Some(r)) => ControlFlow::Break(client_answer(key, r.value())),
                Err(e) => ControlFlow::Break(Err(store_error(e))),
            }
        };
        // Replies posted to another node arrive through the store; re-check now and then in
        // case the change feed was missed.
        let topics = [Topic::key(REPLIES_NS, rkey)];
        let answer = match inner
            .hub
            .wait_until(&topics, RECHECK, stop, (), check)
            .await
        {
            Ok(answer) => answer?,
            Err(stopped) => return Err(stopped),
        };
        responses.insert(key.to_owned(), answer);
    }
    Ok(responses)
}

/// The result of a client's stored reply to the `key` input request, or the error it answered
/// with.
fn client_answer(key: &str, stored: &[u8]) -> Result<Value, ErrorData> {
    let reply: Value = serde_json::from_slice(stored)
        .map_err(|e| jsonrpc::internal(format!("corrupt client reply: {e}")))?;
    if let Some(result) = reply.get("result") {
        return Ok(result.clone());
    }
    let err: ErrorData = reply
        .get("error")
        .and_then(|e| serde_json::from_value(e.clone()).ok())
        .unwrap_or_else(|| jsonrpc::internal("client replied with an error"));
    Err(ErrorData::new(
        err.code,
        format!("The client answered {key} with an error: {}", err.message),
        err.data,
    ))
}

/// Stores a client's reply to a server-to-client request.
pub(crate) async fn store_reply(
    inner: &Inner,
    session: &str,
    id: &RequestId,
    reply: Value,
) -> Result<(), haven_state::StoreError> {
    let key = reply_key(session, id);
    inner
        .store
        .commit(haven_state::Batch::new().put_ttl(
            REPLIES_NS,
            &key,
            serde_json::to_vec(&reply).expect("JSON serializes"),
            3_600_000,
        ))
        .await
        .map(|_| ())
}

/// A number or string id as JSON (for reply records).
pub(crate) fn id_json(id: &RequestId) -> Value {
    match id {
        NumberOrString::Number(n) => Value::from(*n),
        NumberOrString::String(s) => Value::from(s.to_string()),
    }
}
