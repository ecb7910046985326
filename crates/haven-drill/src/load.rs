//! The drill's own load, sent through the load balancer while a fault happens, and what every
//! client saw.
//!
//! Clients, each one request after another:
//! - **stateless**: 2026-07-28-era `echo` calls (per-request `_meta`, no session);
//! - **session**: a legacy-era (2025-11-25) session calling `echo`, answered as JSON or SSE;
//!   a session the deployment forgets (HTTP 404) is a failure of the session service;
//! - **write**: 2026-07-28-era `notes_put` of a note with a unique name; every acknowledged
//!   write is recorded and read back at the end (what is missing is the drill's RPO);
//! - **long**: a legacy-era `sleep` of a few seconds with progress, streamed as SSE and
//!   resumed with `Last-Event-ID` through the load balancer when its connection breaks; its
//!   stored stream is read back at the end to count its final answers (one, never none or two);
//! - **task**: a 2026-07-28-era `sleep` made a task (the tasks extension), polled with
//!   `tasks/get` until it ends; afterwards its status is read back (the one the client saw);
//! - **probes** of the registry, configuration and secrets services (admin API).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::scenario::Component;

const LEGACY: &str = "2025-11-25";
const STATELESS: &str = "2026-07-28";
/// The longest a request may take before it counts as failed (timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a long call keeps resuming before it counts as never answered.
const LONG_CALL_DEADLINE: Duration = Duration::from_secs(60);
/// A long call's stream with no event for this long is resumed.
const STREAM_IDLE: Duration = Duration::from_secs(5);
/// Resumptions in a row answered "no such stream" (400) or "no such session" (404) after
/// which a long call's client gives up on it.
const GONE_AFTER: u32 = 25;

/// What a client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// 2026-07-28 `echo`.
    Stateless,
    /// Legacy session `echo`.
    Session,
    /// 2026-07-28 `notes_put` with a unique name.
    Write,
    /// Legacy `sleep` with progress, resumed by `Last-Event-ID`.
    Long,
    /// 2026-07-28 `sleep` as a task, polled to its end.
    Task,
    /// `GET /admin/v1/registry`.
    Registry,
    /// `GET /admin/v1/config`.
    Config,
    /// `GET /admin/v1/secrets`.
    Secrets,
}

impl Kind {
    /// The component whose recovery this client's requests show.
    pub fn component(self) -> Component {
        match self {
            Kind::Stateless | Kind::Write => Component::LoadBalancer,
            Kind::Session | Kind::Long | Kind::Task => Component::SessionService,
            Kind::Registry => Component::Registry,
            Kind::Config => Component::Configuration,
            Kind::Secrets => Component::Secrets,
        }
    }

    /// Whether it is an MCP client (as opposed to an admin probe).
    pub fn is_client(self) -> bool {
        matches!(
            self,
            Kind::Stateless | Kind::Session | Kind::Write | Kind::Long | Kind::Task
        )
    }
}

/// One request and its outcome; times in seconds since the drill started.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Which client sent it.
    pub client: u32,
    /// What kind of client.
    pub kind: Kind,
    /// When it was sent.
    pub start: f64,
    /// When its outcome was known.
    pub end: f64,
    /// Why it failed (`None`: it succeeded), e.g. `http-503`, `transport`, `timeout`,
    /// `session-lost`, `rpc-error`, `tool-error`, `protocol`.
    pub error: Option<String>,
}

/// An acknowledged write.
#[derive(Clone, Debug, Serialize)]
pub struct Ack {
    /// The note's name.
    pub name: String,
    /// When the acknowledgement arrived (seconds since the drill started).
    pub at: f64,
    /// The text written: a note read back with another text counts as lost.
    pub text: String,
}

/// One long call as its client saw it.
#[derive(Clone, Debug, Serialize)]
pub struct LongCall {
    /// Which client.
    pub client: u32,
    /// When it was sent.
    pub start: f64,
    /// When its final answer arrived (`None`: never, within the deadline).
    pub end: Option<f64>,
    /// Final answers its client received.
    pub finals_seen: u32,
    /// Times its stream was resumed with `Last-Event-ID`.
    pub resumes: u32,
    /// Final answers in its stored stream, read back after the drill (`None`: it could not
    /// be read back).
    pub finals_stored: Option<u32>,
    #[serde(skip)]
    session: String,
    #[serde(skip)]
    stream: Option<String>,
    #[serde(skip)]
    id: u64,
}

impl LongCall {
    /// A long call as a report sees it (for tests of reports).
    #[cfg(test)]
    pub(crate) fn seen(start: f64, finals_seen: u32, finals_stored: Option<u32>) -> LongCall {
        LongCall {
            client: 0,
            start,
            end: (finals_seen > 0).then_some(start + 1.0),
            finals_seen,
            resumes: 0,
            finals_stored,
            session: String::new(),
            stream: Some(String::new()),
            id: 1,
        }
    }
}

/// One task as its client saw it.
#[derive(Clone, Debug, Serialize)]
pub struct TaskRun {
    /// Which client.
    pub client: u32,
    /// When its creation was acknowledged (seconds since the drill started).
    pub created: f64,
    /// Its end as the client saw it: `completed`, `failed` or `cancelled` (`None`: not
    /// within the deadline).
    pub status: Option<String>,
    /// The deployment answered that it knows no such task.
    pub lost: bool,
    /// Its status read back after the drill (`None`: it could not be read).
    pub status_read_back: Option<String>,
    #[serde(skip)]
    pub(crate) id: String,
}

/// Everything the clients saw.
pub struct Recorder {
    t0: Instant,
    samples: Mutex<Vec<Sample>>,
    acks: Mutex<Vec<Ack>>,
    attempted: Mutex<Vec<String>>,
    long: Mutex<Vec<LongCall>>,
    tasks: Mutex<Vec<TaskRun>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            t0: Instant::now(),
            samples: Mutex::default(),
            acks: Mutex::default(),
            attempted: Mutex::default(),
            long: Mutex::default(),
            tasks: Mutex::default(),
        })
    }

    /// Seconds since the drill started.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn sample(&self, client: u32, kind: Kind, start: f64, error: Option<String>) {
        let end = self.now();
        self.samples.lock().unwrap().push(Sample {
            client,
            kind,
            start,
            end,
            error,
        });
    }

    /// Every request so far, in the order their outcomes arrived.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Whether every client and probe has been served since `t`: a request sent at or after
    /// `t` succeeded, or for long calls and tasks (which last seconds), one answered
    /// successfully at or after `t`. The deployment serves everyone again; a long call
    /// answered "interrupted" by the last fault is not yet a recovery.
    pub fn all_served_since(&self, t: f64) -> bool {
        let samples = self.samples.lock().unwrap();
        let mut clients: Vec<(u32, bool)> = Vec::new();
        for x in samples.iter() {
            let since = match x.kind {
                Kind::Long | Kind::Task => x.end,
                _ => x.start,
            };
            let ok = since >= t && x.error.is_none();
            match clients.iter_mut().find(|c| c.0 == x.client) {
                Some(c) => c.1 |= ok,
                None => clients.push((x.client, ok)),
            }
        }
        !clients.is_empty() && clients.iter().all(|c| c.1)
    }

    /// Every acknowledged write.
    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    /// Every long call.
    pub fn long_calls(&self) -> Vec<LongCall> {
        self.long.lock().unwrap().clone()
    }

    /// Every task created.
    pub fn tasks(&self) -> Vec<TaskRun> {
        self.tasks.lock().unwrap().clone()
    }
}

/// How much load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The load balancer's base URL (`http://HOST:PORT`); MCP is at `/mcp`.
    pub base: String,
    /// The admin token (for the probes).
    pub admin_token: Option<String>,
    /// Requests per second over the stateless, session and write clients together.
    pub rate: f64,
    /// Clients of each of those three kinds.
    pub clients_per_kind: u32,
    /// Clients making long calls (one at a time each).
    pub long_clients: u32,
    /// Clients running tasks (one at a time each).
    pub task_clients: u32,
    /// Seconds each long call sleeps.
    pub long_seconds: u32,
    /// A name for this run, in the names of the notes it writes.
    pub run: String,
}

/// The running clients.
pub struct Load {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(4)
        .build()
        .expect("a client with no TLS settings always builds")
}

impl Load {
    /// Starts every client.
    pub fn start(opts: LoadOptions, rec: Arc<Recorder>) -> Load {
        let (stop, watch) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let opts = Arc::new(opts);
        let paced = (opts.clients_per_kind * 3).max(1);
        let interval = Duration::from_secs_f64(paced as f64 / opts.rate.max(0.1));
        let mut client = 0u32;
        for kind in [Kind::Stateless, Kind::Session, Kind::Write] {
            for _ in 0..opts.clients_per_kind {
                let (o, r, w) = (opts.clone(), rec.clone(), watch.clone());
                tasks.spawn(paced_client(kind, client, interval, o, r, w));
                client += 1;
            }
        }
        for _ in 0..opts.long_clients {
            let (o, r, w) = (opts.clone(), rec.clone(), watch.clone());
            tasks.spawn(long_client(client, o, r, w));
            client += 1;
        }
        for _ in 0..opts.task_clients {
            let (o, r, w) = (opts.clone(), rec.clone(), watch.clone());
            tasks.spawn(task_client(client, o, r, w));
            client += 1;
        }
        if opts.admin_token.is_some() {
            for kind in [Kind::Registry, Kind::Config, Kind::Secrets] {
                let (o, r, w) = (opts.clone(), rec.clone(), watch.clone());
                tasks.spawn(paced_client(
                    kind,
                    client,
                    Duration::from_millis(250),
                    o,
                    r,
                    w,
                ));
                client += 1;
            }
        }
        Load { stop, tasks }
    }

    /// Stops every client after its request in flight (a long call runs to its end).
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Sleeps until `next` or until the load stops; false once it stopped.
async fn pace(next: Instant, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep_until(next.into()) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    !stopped && !*stop.borrow()
}

async fn paced_client(
    kind: Kind,
    client: u32,
    interval: Duration,
    opts: Arc<LoadOptions>,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let http = http_client();
    let mut session: Option<String> = None;
    let mut n = 0u64;
    let mut next = Instant::now();
    while pace(next, &mut stop).await {
        next += interval;
        if next < Instant::now() {
            next = Instant::now();
        }
        n += 1;
        let start = rec.now();
        let result = match kind {
            Kind::Stateless => {
                stateless_call(&http, &opts.base, n, "echo", json!({"text": "drill"}))
                    .await
                    .map(|_| ())
            }
            Kind::Write => {
                let name = format!("drill-{}-{client}-{n}", opts.run);
                rec.attempted.lock().unwrap().push(name.clone());
                let text = n.to_string();
                let r = stateless_call(
                    &http,
                    &opts.base,
                    n,
                    "notes_put",
                    json!({"name": name, "text": text}),
                )
                .await;
                if r.is_ok() {
                    let at = rec.now();
                    rec.acks.lock().unwrap().push(Ack { name, at, text });
                }
                r.map(|_| ())
            }
            Kind::Session => session_call(&http, &opts.base, &mut session, n).await,
            Kind::Registry | Kind::Config | Kind::Secrets => {
                let path = match kind {
                    Kind::Registry => "registry",
                    Kind::Config => "config",
                    _ => "secrets",
                };
                admin_get(&http, &opts, path).await
            }
            Kind::Long | Kind::Task => unreachable!("long calls and tasks have their own clients"),
        };
        rec.sample(client, kind, start, result.err());
    }
}

async fn admin_get(http: &reqwest::Client, opts: &LoadOptions, path: &str) -> Result<(), String> {
    let r = http
        .get(format!("{}/admin/v1/{path}", opts.base))
        .bearer_auth(opts.admin_token.as_deref().unwrap_or_default())
        .send()
        .await
        .map_err(transport)?;
    if r.status() != 200 {
        return Err(format!("http-{}", r.status().as_u16()));
    }
    r.bytes().await.map_err(transport)?;
    Ok(())
}

fn transport(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else {
        "transport".into()
    }
}

/// The client capabilities of a 2026-07-28 client of the tasks extension.
fn tasks_caps() -> Value {
    json!({"extensions": {"io.modelcontextprotocol/tasks": {}}})
}

/// A 2026-07-28 request of `method` with `params` and client capabilities `caps`; its whole
/// JSON-RPC answer (result or error), or why there was none.
async fn stateless_rpc(
    http: &reqwest::Client,
    base: &str,
    id: u64,
    method: &str,
    params: Value,
    caps: Value,
) -> Result<Value, String> {
    let mut params = params;
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": STATELESS,
        "io.modelcontextprotocol/clientCapabilities": caps,
        "io.modelcontextprotocol/clientInfo": {"name": "haven-drill", "version": "1"}
    });
    let mut req = http
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("mcp-protocol-version", STATELESS)
        .header("mcp-method", method);
    // `Mcp-Name` repeats what the request names: a tool, or a task.
    if let Some(n) = ["name", "taskId"]
        .iter()
        .find_map(|k| params.get(*k).and_then(Value::as_str))
    {
        req = req.header("mcp-name", n.to_owned());
    }
    let r = req
        .body(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string())
        .send()
        .await
        .map_err(transport)?;
    if r.status() != 200 {
        return Err(format!("http-{}", r.status().as_u16()));
    }
    r.json::<Value>().await.map_err(|_| "protocol".to_owned())
}

/// How long a task's client polls it before it counts as never ended.
const TASK_DEADLINE: Duration = Duration::from_secs(60);

async fn task_client(
    client: u32,
    opts: Arc<LoadOptions>,
    rec: Arc<Recorder>,
    stop: watch::Receiver<bool>,
) {
    let http = http_client();
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let start = rec.now();
        let created = stateless_rpc(
            &http,
            &opts.base,
            n,
            "tools/call",
            json!({"name": "sleep", "arguments": {"seconds": opts.long_seconds}}),
            tasks_caps(),
        )
        .await;
        let id = match created {
            Ok(v) if v["result"]["resultType"] == "task" => v["result"]["taskId"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            Ok(v) => {
                let e = if v.get("error").is_some() {
                    "rpc-error"
                } else {
                    "protocol"
                };
                rec.sample(client, Kind::Task, start, Some(e.into()));
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Err(e) => {
                rec.sample(client, Kind::Task, start, Some(e));
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let mut run = TaskRun {
            client,
            created: rec.now(),
            status: None,
            lost: false,
            status_read_back: None,
            id,
        };
        let error = follow_task(&http, &opts.base, &mut run, n).await;
        rec.tasks.lock().unwrap().push(run);
        rec.sample(client, Kind::Task, start, error);
    }
}

/// Whether `status` is the end of a task.
fn ended(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// Polls a task every 250 ms until it ends (or the deadline); the failure its client saw.
async fn follow_task(
    http: &reqwest::Client,
    base: &str,
    run: &mut TaskRun,
    n: u64,
) -> Option<String> {
    let deadline = Instant::now() + TASK_DEADLINE;
    let mut poll = 0u64;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        poll += 1;
        let got = stateless_rpc(
            http,
            base,
            n * 1_000 + poll,
            "tasks/get",
            json!({"taskId": run.id}),
            tasks_caps(),
        )
        .await;
        let Ok(v) = got else {
            continue;
        };
        if let Some(status) = v["result"]["status"].as_str() {
            if ended(status) {
                run.status = Some(status.to_owned());
                return (status != "completed").then(|| format!("task-{status}"));
            }
            continue;
        }
        if v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not found"))
        {
            run.lost = true;
            return Some("task-lost".into());
        }
    }
    Some("task-unfinished".into())
}

/// Reads back the status of every task its client saw end, through `base`.
pub async fn read_back_tasks(base: &str, rec: &Recorder) {
    let http = http_client();
    let runs = rec.tasks();
    let mut read = Vec::with_capacity(runs.len());
    for (i, t) in runs.iter().enumerate() {
        let mut status = None;
        for _ in 0..3 {
            match stateless_rpc(
                &http,
                base,
                i as u64 + 1,
                "tasks/get",
                json!({"taskId": t.id}),
                tasks_caps(),
            )
            .await
            {
                Ok(v) => {
                    status = Some(
                        v["result"]["status"]
                            .as_str()
                            .map_or_else(|| "unknown".to_owned(), str::to_owned),
                    );
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        read.push(status);
    }
    let mut tasks = rec.tasks.lock().unwrap();
    for (t, s) in tasks.iter_mut().zip(read) {
        t.status_read_back = s;
    }
}

/// A 2026-07-28 `tools/call`; the result on success.
pub(crate) async fn stateless_call(
    http: &reqwest::Client,
    base: &str,
    id: u64,
    tool: &str,
    arguments: Value,
) -> Result<Value, String> {
    let body = json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {
            "name": tool, "arguments": arguments,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": STATELESS,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "haven-drill", "version": "1"}
            }
        }
    });
    let r = http
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", STATELESS)
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(body.to_string())
        .send()
        .await
        .map_err(transport)?;
    let status = r.status().as_u16();
    let sse = is_sse(&r);
    if status != 200 {
        return Err(format!("http-{status}"));
    }
    let v = if sse {
        let mut reader = SseReader::new(r);
        loop {
            match reader.next().await {
                Ok(Some(e)) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&e.data)
                        && is_response_to(&v, id)
                    {
                        break v;
                    }
                }
                Ok(None) => return Err("protocol".into()),
                Err(e) => return Err(e),
            }
        }
    } else {
        r.json::<Value>().await.map_err(|_| "protocol".to_owned())?
    };
    result_of(v)
}

/// The result of a JSON-RPC response, or why it failed.
fn result_of(v: Value) -> Result<Value, String> {
    if v.get("error").is_some() {
        return Err("rpc-error".into());
    }
    let Some(result) = v.get("result") else {
        return Err("protocol".into());
    };
    if result.get("isError") == Some(&Value::Bool(true)) {
        return Err("tool-error".into());
    }
    Ok(result.clone())
}

fn is_sse(r: &reqwest::Response) -> bool {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

fn is_response_to(v: &Value, id: u64) -> bool {
    v.get("id") == Some(&json!(id)) && (v.get("result").is_some() || v.get("error").is_some())
}

/// `initialize` and `notifications/initialized` of a legacy session; its id.
async fn initialize(http: &reqwest::Client, base: &str) -> Result<String, String> {
    let r = http
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                "protocolVersion": LEGACY, "capabilities": {},
                "clientInfo": {"name": "haven-drill", "version": "1"}}})
            .to_string(),
        )
        .send()
        .await
        .map_err(transport)?;
    if r.status() != 200 {
        return Err(format!("http-{}", r.status().as_u16()));
    }
    let session = r
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .ok_or("protocol")?
        .to_owned();
    r.bytes().await.map_err(transport)?;
    let r = http
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", LEGACY)
        .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
        .send()
        .await
        .map_err(transport)?;
    if r.status() != 202 {
        return Err(format!("http-{}", r.status().as_u16()));
    }
    Ok(session)
}

/// One `echo` in the client's legacy session (opened first when it has none; forgotten when
/// the deployment answers 404, which is a failure of its own kind).
async fn session_call(
    http: &reqwest::Client,
    base: &str,
    session: &mut Option<String>,
    id: u64,
) -> Result<(), String> {
    if session.is_none() {
        *session = Some(initialize(http, base).await?);
    }
    let sid = session.clone().unwrap_or_default();
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
        "params":{"name":"echo","arguments":{"text":"drill"}}});
    let r = http
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &sid)
        .header("mcp-protocol-version", LEGACY)
        .body(body.to_string())
        .send()
        .await
        .map_err(transport)?;
    match r.status().as_u16() {
        200 => {}
        404 => {
            *session = None;
            return Err("session-lost".into());
        }
        s => return Err(format!("http-{s}")),
    }
    if !is_sse(&r) {
        let v = r.json::<Value>().await.map_err(|_| "protocol".to_owned())?;
        return result_of(v).map(|_| ());
    }
    let mut reader = SseReader::new(r);
    let mut last = None;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let next = reader.next().await.unwrap_or_default();
        match next {
            Some(e) => {
                if e.id.is_some() {
                    last = e.id.clone();
                }
                if let Ok(v) = serde_json::from_str::<Value>(&e.data)
                    && is_response_to(&v, id)
                {
                    return result_of(v).map(|_| ());
                }
            }
            None => {
                // The stream broke before its answer: resume it where it stopped.
                let Some(after) = last.clone() else {
                    return Err("transport".into());
                };
                if Instant::now() > deadline {
                    return Err("timeout".into());
                }
                match resume(http, base, &sid, &after).await {
                    Ok(r) => reader = SseReader::new(r),
                    Err(e) => {
                        if e == "http-404" {
                            *session = None;
                            return Err("session-lost".into());
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

/// A GET of the session's stream after the event `after`.
async fn resume(
    http: &reqwest::Client,
    base: &str,
    session: &str,
    after: &str,
) -> Result<reqwest::Response, String> {
    let r = http
        .get(format!("{base}/mcp"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", LEGACY)
        .header("last-event-id", after)
        .timeout(Duration::from_secs(3600))
        .send()
        .await
        .map_err(transport)?;
    if r.status() != 200 {
        return Err(format!("http-{}", r.status().as_u16()));
    }
    Ok(r)
}

async fn long_client(
    client: u32,
    opts: Arc<LoadOptions>,
    rec: Arc<Recorder>,
    stop: watch::Receiver<bool>,
) {
    // A stream's connection stays open for the whole call: no overall request timeout.
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("a client with no TLS settings always builds");
    let mut session: Option<String> = None;
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let start = rec.now();
        let sid = match &session {
            Some(s) => s.clone(),
            None => match initialize(&http, &opts.base).await {
                Ok(s) => {
                    session = Some(s.clone());
                    s
                }
                Err(e) => {
                    rec.sample(client, Kind::Long, start, Some(e));
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            },
        };
        let mut call = LongCall {
            client,
            start,
            end: None,
            finals_seen: 0,
            resumes: 0,
            finals_stored: None,
            session: sid.clone(),
            stream: None,
            id: n,
        };
        let error = long_call(&http, &opts, &rec, &mut call).await;
        if error.as_deref() == Some("session-lost") {
            session = None;
        }
        let sent = call.stream.is_some();
        if sent {
            rec.long.lock().unwrap().push(call);
        }
        rec.sample(client, Kind::Long, start, error);
        if !sent {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Sends one long call and follows its stream to its final answer, resuming as needed; the
/// failure the client saw, if any.
async fn long_call(
    http: &reqwest::Client,
    opts: &LoadOptions,
    rec: &Recorder,
    call: &mut LongCall,
) -> Option<String> {
    let id = call.id;
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{
        "name":"sleep","arguments":{"seconds": opts.long_seconds},
        "_meta":{"progressToken": format!("drill-{id}")}}});
    let sent = http
        .post(format!("{}/mcp", opts.base))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &call.session)
        .header("mcp-protocol-version", LEGACY)
        .timeout(Duration::from_secs(3600))
        .body(body.to_string())
        .send()
        .await;
    let r = match sent {
        Ok(r) => r,
        Err(e) => return Some(transport(e)),
    };
    match r.status().as_u16() {
        200 if is_sse(&r) => {}
        200 => return Some("protocol".into()),
        404 => return Some("session-lost".into()),
        s => return Some(format!("http-{s}")),
    }
    let deadline = Instant::now() + LONG_CALL_DEADLINE;
    let mut reader = Some(SseReader::new(r));
    let mut last: Option<String> = None;
    // Whether the stream read now has sent nothing yet since it was resumed.
    let mut quiet = false;
    // Resumptions in a row answered that the stream or the session is not there.
    let mut gone = 0;
    while Instant::now() < deadline {
        let Some(s) = reader.as_mut() else {
            let Some(after) = last.clone() else {
                return Some("transport".into());
            };
            call.resumes += 1;
            match resume(http, &opts.base, &call.session, &after).await {
                Ok(r) => {
                    reader = Some(SseReader::new(r));
                    quiet = true;
                    gone = 0;
                }
                Err(e) if e == "http-400" || e == "http-404" => {
                    // The deployment's state holds no such stream or session: a restore
                    // took it back to a point before the call. Asked again for a while
                    // (a region that takes over may still be receiving it), then given up.
                    gone += 1;
                    if gone >= GONE_AFTER {
                        return Some(if e == "http-404" {
                            "session-lost".into()
                        } else {
                            "stream-gone".into()
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            continue;
        };
        let e = match tokio::time::timeout(STREAM_IDLE, s.next()).await {
            Ok(Ok(Some(e))) => e,
            _ => {
                reader = None;
                // A resumed stream that ended with nothing new: a pause before the next.
                if quiet {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            }
        };
        quiet = false;
        if let Some(i) = &e.id {
            last = Some(i.clone());
            if call.stream.is_none() {
                call.stream = i.rsplit_once('-').map(|(s, _)| s.to_owned());
            }
        }
        if let Ok(v) = serde_json::from_str::<Value>(&e.data)
            && is_response_to(&v, id)
        {
            call.finals_seen += 1;
            call.end = Some(rec.now());
            // A call whose stream was resumed and then answered is a success: resuming is
            // what the protocol asks of a client, and the answer arrived.
            return result_of(v).err();
        }
    }
    Some("never-answered".into())
}

/// Reads back the stored stream of every long call that got a stream id, counting the final
/// answers it holds (exactly one each, if nothing was answered twice).
pub async fn read_back_long_calls(base: &str, rec: &Recorder) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("a client with no TLS settings always builds");
    let calls = rec.long_calls();
    let mut counted = Vec::with_capacity(calls.len());
    for c in &calls {
        let Some(stream) = &c.stream else {
            counted.push(None);
            continue;
        };
        counted.push(count_stored_finals(&http, base, &c.session, stream, c.id).await);
    }
    let mut long = rec.long.lock().unwrap();
    for (c, n) in long.iter_mut().zip(counted) {
        c.finals_stored = n;
    }
}

async fn count_stored_finals(
    http: &reqwest::Client,
    base: &str,
    session: &str,
    stream: &str,
    id: u64,
) -> Option<u32> {
    for _ in 0..3 {
        let Ok(r) = resume(http, base, session, &format!("{stream}-0")).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut reader = SseReader::new(r);
        let mut finals = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(3), reader.next()).await {
                Ok(Ok(Some(e))) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&e.data)
                        && is_response_to(&v, id)
                    {
                        finals += 1;
                    }
                }
                // The stream ended (a finished stream closes after its last event), or
                // nothing more came.
                Ok(Ok(None)) | Err(_) => return Some(finals),
                Ok(Err(_)) => break,
            }
        }
    }
    None
}

/// Reads back every acknowledged write; the names of those missing (or holding another text).
pub async fn missing_writes(base: &str, acks: &[Ack]) -> Result<Vec<String>, String> {
    let http = http_client();
    let mut missing = Vec::new();
    for (i, a) in acks.iter().enumerate() {
        let mut last = String::new();
        let mut found = None;
        for _ in 0..5 {
            match stateless_call(
                &http,
                base,
                i as u64 + 1,
                "notes_get",
                json!({"name": a.name}),
            )
            .await
            {
                Ok(v) => {
                    // Present with the text written (a note changed since counts as lost).
                    found = Some(v["content"][0]["text"].as_str() == Some(a.text.as_str()));
                    break;
                }
                Err(e) if e == "tool-error" => {
                    found = Some(false);
                    break;
                }
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        match found {
            Some(true) => {}
            Some(false) => missing.push(a.name.clone()),
            None => {
                return Err(format!(
                    "reading back the note {} failed five times (last: {last})",
                    a.name
                ));
            }
        }
    }
    Ok(missing)
}

/// Deletes every note the drill tried to write (best effort: a deployment keeps no drill
/// data); how many could not be deleted.
pub async fn clean_up(base: &str, rec: &Recorder) -> usize {
    let http = http_client();
    let names = rec.attempted.lock().unwrap().clone();
    let mut failed = 0;
    for (i, name) in names.iter().enumerate() {
        match stateless_call(
            &http,
            base,
            i as u64 + 1,
            "notes_delete",
            json!({"name": name}),
        )
        .await
        {
            Ok(_) => {}
            // Never written (its write failed before the store): nothing to delete.
            Err(e) if e == "tool-error" => {}
            Err(_) => failed += 1,
        }
    }
    failed
}

/// One server-sent event.
pub(crate) struct SseEvent {
    pub id: Option<String>,
    pub data: String,
}

/// Server-sent events from a response body, read chunk by chunk.
pub(crate) struct SseReader {
    response: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> SseReader {
        SseReader {
            response,
            buf: String::new(),
        }
    }

    /// The next event; `None` when the stream ended; an error when the connection broke.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if id.is_none() && data.is_empty() {
                    continue;
                }
                return Ok(Some(SseEvent {
                    id,
                    data: data.join("\n"),
                }));
            }
            match self.response.chunk().await {
                Ok(Some(c)) => self
                    .buf
                    .push_str(&String::from_utf8_lossy(&c).replace("\r\n", "\n")),
                Ok(None) => return Ok(None),
                Err(e) => return Err(transport(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(rec: &Recorder, client: u32, kind: Kind, start: f64, end: f64, ok: bool) {
        rec.samples.lock().unwrap().push(Sample {
            client,
            kind,
            start,
            end,
            error: (!ok).then(|| "rpc-error".to_owned()),
        });
    }

    #[test]
    fn a_long_call_interrupted_by_the_last_fault_is_not_yet_a_recovery() {
        let rec = Recorder::new();
        push(&rec, 0, Kind::Stateless, 9.0, 9.1, false);
        push(&rec, 0, Kind::Stateless, 10.5, 10.6, true);
        // Sent before the repair at 10 s, answered "interrupted" after it.
        push(&rec, 1, Kind::Long, 8.0, 11.0, false);
        assert!(!rec.all_served_since(10.0));
        // The next long call is answered: every client is served again.
        push(&rec, 1, Kind::Long, 11.2, 14.2, true);
        assert!(rec.all_served_since(10.0));
    }

    #[test]
    fn a_long_call_resumed_and_answered_after_the_repair_is_a_recovery() {
        let rec = Recorder::new();
        push(&rec, 0, Kind::Write, 10.1, 10.2, true);
        push(&rec, 1, Kind::Task, 8.0, 12.0, true);
        assert!(rec.all_served_since(10.0));
        // A request sent before the repair does not count for a paced client.
        push(&rec, 2, Kind::Session, 9.9, 10.3, true);
        assert!(!rec.all_served_since(10.0));
    }
}
