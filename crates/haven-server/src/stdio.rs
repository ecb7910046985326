//! MCP over stdio: one JSON-RPC message per line in each direction. The same engine serves it,
//! so sessions, tasks and notes behave exactly as over HTTP.

use std::sync::Arc;

use futures::StreamExt;
use haven_mcp::engine::{
    Engine, LegacyPost, Reply, SseFrame, StatelessHeaders, StatelessPost, is_stateless,
};
use haven_mcp::jsonrpc::{self, Incoming};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// The stdio connection's legacy session, once initialized.
#[derive(Default)]
struct Slot(std::sync::Mutex<Option<String>>);

impl Slot {
    fn get(&self) -> Option<String> {
        self.0.lock().map(|g| g.clone()).unwrap_or(None)
    }

    fn set(&self, v: String) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(v);
        }
    }
}

/// Serves MCP on `input`/`output` until `input` ends.
pub async fn serve_stdio<R, W>(engine: Engine, input: R, output: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut output = output;
        while let Some(line) = rx.recv().await {
            output.write_all(line.as_bytes()).await?;
            output.write_all(b"\n").await?;
            output.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let session = Arc::new(Slot::default());
    let mut lines = BufReader::new(input).lines();
    let mut running = tokio::task::JoinSet::new();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let message = match jsonrpc::parse(line.as_bytes()) {
            Ok(m) => m,
            Err(m) => {
                let _ = tx.send(jsonrpc::error_response(m.id.as_ref(), &m.error));
                continue;
            }
        };
        if is_stateless(None, &message) {
            let headers = synthesized_headers(&message);
            let engine = engine.clone();
            let tx = tx.clone();
            running.spawn(async move {
                write_reply(
                    engine
                        .stateless_post(StatelessPost {
                            headers,
                            message,
                            from_http: false,
                            // The process on the other end of stdio started this one.
                            principal: haven_auth::Principal::anonymous(),
                            trace: Default::default(),
                        })
                        .await,
                    &tx,
                )
                .await;
            });
            continue;
        }
        let initialize = matches!(&message, Incoming::Request(r) if r.method == "initialize");
        let post = LegacyPost {
            session: session.get(),
            protocol_version: None,
            accepts_json: true,
            accepts_sse: true,
            message,
            principal: haven_auth::Principal::anonymous(),
            trace: Default::default(),
        };
        if initialize {
            // Later lines use the session, so it must exist before the next line is read.
            let reply = engine.legacy_post(post).await;
            if let Reply::Json {
                session: Some(s), ..
            } = &reply
            {
                session.set(s.clone());
            }
            write_reply(reply, &tx).await;
        } else {
            let engine = engine.clone();
            let tx = tx.clone();
            running.spawn(async move { write_reply(engine.legacy_post(post).await, &tx).await });
        }
    }
    // Input ended: let running requests finish, then stop writing.
    while running.join_next().await.is_some() {}
    drop(tx);
    writer.await.map_err(std::io::Error::other)?
}

/// Over stdio there are no HTTP headers; the routing headers a stateless request would carry
/// are derived from its body.
fn synthesized_headers(message: &Incoming) -> StatelessHeaders {
    let Incoming::Request(r) = message else {
        return StatelessHeaders::default();
    };
    let params = r.params.as_ref();
    let name = ["name", "uri", "taskId"]
        .iter()
        .find_map(|k| params.and_then(|p| p.get(*k)).and_then(Value::as_str))
        .map(str::to_owned);
    let version = r.meta().ok().flatten().and_then(|m| m.protocol_version);
    StatelessHeaders {
        protocol_version: version,
        method: Some(r.method.clone()),
        name,
        params: Vec::new(),
    }
}

async fn write_reply(reply: Reply, tx: &mpsc::UnboundedSender<String>) {
    match reply {
        Reply::Json { body, .. } => {
            let _ = tx.send(body);
        }
        Reply::Stream(mut frames) => {
            while let Some(f) = frames.next().await {
                if let SseFrame::Event { data, .. } = f
                    && !data.is_empty()
                    && tx.send(data).is_err()
                {
                    return;
                }
            }
        }
        // Over stdio a refusal is just its JSON-RPC error; there is no status to carry.
        Reply::Rejected(r) => {
            let _ = tx.send(r.body());
        }
        Reply::Accepted | Reply::SessionEnded => {}
    }
}
