//! Forwarded calls to an HTTP upstream, sent from the task that handles the client's call.
//!
//! rmcp's client service sends a request through two tasks and their channels (the service,
//! then the transport worker) and routes the answer back the same way. Measured on a
//! federated `tools/call`, those hops cost about 40 % of the call's throughput
//! (BENCHMARKS.md, "Sizing the lever"). A forwarded call to an HTTP upstream is posted here
//! instead, in the session rmcp's worker opened ([`SessionContext`]), with a request id of
//! its own kind (`haven-N`, never one of rmcp's numbers); the handshake, the lists, the
//! session's own event stream and everything stdio stay with rmcp.
//!
//! The answer is read as rmcp's worker reads it: a JSON answer is the result; an SSE answer
//! is read until the call's answer, its notifications and requests taken as the connection's
//! [`Handler`] takes them (progress relayed to the client, the upstream's requests answered
//! by a POST), and resumed from its last event (`Last-Event-ID`) if it ends before the answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use rmcp::model::{
    ClientJsonRpcMessage, ErrorData, JsonRpcMessage, JsonRpcRequest, NumberOrString, ProgressToken,
    RequestId, ServerJsonRpcMessage, ServerRequest, ServerResult,
};
use rmcp::transport::streamable_http_client::StreamableHttpPostResponse;

use crate::connect::{self, Handler};
use crate::failure::{Failure, Reason};
use crate::http::{Encoded, SessionContext, UpstreamHttp};

/// Times an answer's stream is resumed after it ended before the answer.
const MAX_RESUMES: u32 = 3;

/// How forwarded calls reach one HTTP upstream without rmcp's service.
pub(crate) struct Direct {
    pub http: UpstreamHttp,
    pub handler: Handler,
}

/// How a call sent directly ended.
pub(crate) enum Outcome {
    Answered(Box<ServerResult>),
    UpstreamError(ErrorData),
    NotDelivered(Failure),
    Failed(Failure),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A request id for a call sent directly, and the progress token that goes with it.
pub(crate) fn new_id() -> (RequestId, ProgressToken) {
    let text: Arc<str> = format!("haven-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)).into();
    (
        NumberOrString::String(text.clone()),
        ProgressToken(NumberOrString::String(text)),
    )
}

pub(crate) fn connection_lost() -> Failure {
    Failure::new(
        Reason::ConnectionLost,
        "the connection closed before the upstream answered",
    )
}

impl Direct {
    /// Sends `message` (request `id`, encoded by [`crate::http::encode_call`]) in session `s`
    /// and reads its answer.
    pub(crate) async fn call(
        &self,
        s: &Arc<SessionContext>,
        id: &RequestId,
        message: Encoded,
    ) -> Outcome {
        match self.http.send_in(s, message).await {
            Err(e) if connect::never_reached(&e) => {
                Outcome::NotDelivered(Failure::from_error("the request was not delivered", &e))
            }
            Err(e) => Outcome::Failed(Failure::from_error("the request failed", &e)),
            Ok(StreamableHttpPostResponse::Json(m, _)) => {
                self.take(s, id, m).unwrap_or_else(|| {
                    Outcome::Failed(Failure::new(
                        Reason::Protocol,
                        "answered with a message that is not the request's answer",
                    ))
                })
            }
            Ok(StreamableHttpPostResponse::Accepted) => Outcome::Failed(Failure::new(
                Reason::Protocol,
                "accepted the request without answering it",
            )),
            Ok(StreamableHttpPostResponse::Sse(events, _)) => self.read(s, id, events).await,
            Ok(_) => Outcome::Failed(Failure::new(
                Reason::Protocol,
                "answered with a response Haven does not read",
            )),
        }
    }

    /// Reads an answer's event stream until the answer to `id`, resuming it when it ends
    /// first.
    async fn read(
        &self,
        s: &Arc<SessionContext>,
        id: &RequestId,
        mut events: futures::stream::BoxStream<
            'static,
            Result<sse_stream::Sse, rmcp::transport::streamable_http_client::SseError>,
        >,
    ) -> Outcome {
        let mut last_event_id: Option<String> = None;
        let mut resumes = 0;
        loop {
            while let Some(item) = events.next().await {
                let Ok(event) = item else {
                    // A broken stream is resumed like one that ended.
                    break;
                };
                if let Some(eid) = event.id {
                    last_event_id = Some(eid);
                }
                let Some(data) = event.data.filter(|d| !d.trim().is_empty()) else {
                    continue;
                };
                match serde_json::from_str::<ServerJsonRpcMessage>(&data) {
                    Ok(m) => {
                        if let Some(outcome) = self.take(s, id, m) {
                            return outcome;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(upstream = %self.handler.upstream, error = %e, "an event of an answer's stream is not a JSON-RPC message");
                    }
                }
            }
            let Some(last) = last_event_id.clone() else {
                return Outcome::Failed(connection_lost());
            };
            if resumes == MAX_RESUMES {
                return Outcome::Failed(connection_lost());
            }
            resumes += 1;
            match self.http.resume_in(s, last).await {
                Ok(stream) => events = stream,
                Err(e) => {
                    return Outcome::Failed(Failure::from_error(
                        "resuming the answer's stream failed",
                        &e,
                    ));
                }
            }
        }
    }

    /// Takes one message of the answer: the answer to `id` ends the call; notifications and
    /// the upstream's requests are handled as the connection's handler handles them.
    fn take(
        &self,
        s: &Arc<SessionContext>,
        id: &RequestId,
        m: ServerJsonRpcMessage,
    ) -> Option<Outcome> {
        match m {
            JsonRpcMessage::Response(r) if r.id == *id => {
                Some(Outcome::Answered(Box::new(r.result)))
            }
            // An error without an id: the upstream could not read the request.
            JsonRpcMessage::Error(e) if e.id.as_ref().is_none_or(|i| i == id) => {
                Some(Outcome::UpstreamError(e.error))
            }
            JsonRpcMessage::Response(_) | JsonRpcMessage::Error(_) => None,
            JsonRpcMessage::Notification(n) => {
                self.handler.notified(n.notification);
                None
            }
            JsonRpcMessage::Request(r) => {
                self.answer(s, r);
                None
            }
        }
    }

    /// Answers a request of the upstream by a POST in the session, without waiting for it.
    fn answer(&self, s: &Arc<SessionContext>, r: JsonRpcRequest<ServerRequest>) {
        let message = match self.handler.answer(&r.request) {
            Ok(result) => ClientJsonRpcMessage::response(result, r.id),
            Err(e) => ClientJsonRpcMessage::error(e, Some(r.id)),
        };
        let (http, s, upstream) = (self.http.clone(), s.clone(), self.handler.upstream.clone());
        let message = match crate::http::encode(&message) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "answering an upstream's request failed");
                return;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = http.send_in(&s, message).await {
                tracing::debug!(%upstream, error = %e, "answering an upstream's request failed");
            }
        });
    }
}
