//! The distributed backend: the change log is a replicated NATS JetStream stream (one per
//! region), and every node keeps a local index of it.
//!
//! - **Log.** Stream `HAVEN_<REGION>` on subjects `hv.<region>.>`; stream sequence = log
//!   sequence. A record write is a message on `hv.<region>.k.<ns>.<key>`, an event on
//!   `hv.<region>.e.<stream>` (tokens are `_` + hex, so any string is a valid token). The
//!   payload is the postcard-encoded [`Change`], version included.
//! - **Commit.** Every batch is one JetStream atomic batch (server >= 2.12): all its messages
//!   are stored on consecutive sequences or none is. Preconditions are per-subject
//!   `Nats-Expected-Last-Subject-Sequence` headers, checked by the stream leader under its lock,
//!   so two nodes never both win a compare-and-set. A commit is acknowledged after the stream
//!   replicated it to a quorum (and synced it, with `sync_interval: always`).
//! - **Index.** The store is a [`ReplicatedStore`] on this log: each node follows the stream
//!   with an ordered consumer into its own index, applying a batch only once its commit message
//!   arrived, plans commits against it and catches up before reads that must see other nodes'
//!   writes (see `replicated.rs`). While the client has no connection to any server, every
//!   operation fails at once as unavailable instead of waiting for a timeout.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;

use crate::clock::HybridClock;
use crate::record::{Change, LogEntry, LogSubject, Origin};
use crate::replicated::{
    AppendError, COMMIT_TIMEOUT, Delivery, DeliveryStream, LogWrite, Removal, ReplicatedStore,
    SharedLog,
};
use crate::store::{StoreError, StoreResult};

/// Most operations one commit may hold (JetStream's atomic batch limit).
pub const MAX_BATCH_OPS: usize = 1000;

/// The message header of a commit's last entry that holds its writer's trace context (see
/// [`crate::trace`]); outside the payload, so no part of the change.
pub const TRACEPARENT_HEADER: &str = "Haven-Traceparent";

/// Settings of the JetStream backend.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URLs, e.g. `nats://127.0.0.1:4222`.
    pub servers: Vec<String>,
    /// Region name: one stream per region.
    pub region: String,
    /// Stream replicas (3 in production: a write survives the loss of any one server).
    pub replicas: usize,
    /// TLS to the servers (none by default).
    pub tls: NatsTls,
}

/// TLS to the NATS servers. Any of its settings makes TLS required: the client then refuses a
/// server that does not offer it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// Require TLS (verified against the system's roots unless `ca_file` is given).
    pub require: bool,
    /// PEM file of the CA certificates the servers' certificates are verified against.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key presented to the servers (mutual TLS, `verify: true`).
    pub identity: Option<crate::tls::Identity>,
}

impl NatsTls {
    /// Whether TLS is asked for at all.
    pub fn enabled(&self) -> bool {
        self.require || self.ca_file.is_some() || self.identity.is_some()
    }

    /// `options` with this TLS configuration (unchanged when TLS is not asked for).
    pub fn apply(
        &self,
        options: async_nats::ConnectOptions,
    ) -> StoreResult<async_nats::ConnectOptions> {
        if !self.enabled() {
            return Ok(options);
        }
        let config = crate::tls::client_config(self.ca_file.as_deref(), self.identity.as_ref())
            .map_err(|e| StoreError::Invalid(format!("NATS TLS: {e}")))?;
        Ok(options.tls_client_config(config).require_tls(true))
    }
}

fn token(s: &str) -> String {
    let mut t = String::with_capacity(1 + 2 * s.len());
    t.push('_');
    t.push_str(&hex::encode(s.as_bytes()));
    t
}

fn untoken(t: &str) -> Option<String> {
    let bytes = hex::decode(t.strip_prefix('_')?).ok()?;
    String::from_utf8(bytes).ok()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS: {e}"))
}

/// How long the first connection to the servers is retried while none accepts one (a server
/// still starting); beyond it start-up fails, naming the cause.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Connects to `servers` (any one of them), retrying for [`FIRST_CONNECT_WAIT`] while none
/// accepts a connection; then fails with the cause and what to check. Once connected the
/// client reconnects by itself whenever the connection is lost.
async fn first_connect(servers: &[String], tls: &NatsTls) -> StoreResult<async_nats::Client> {
    use async_nats::ConnectErrorKind as Kind;
    let deadline = tokio::time::Instant::now() + FIRST_CONNECT_WAIT;
    let list = servers.join(", ");
    loop {
        let attempt = tls
            .apply(async_nats::ConnectOptions::new())?
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(COMMIT_TIMEOUT))
            .connect(servers.to_vec())
            .await;
        let e = match attempt {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        let cause = connect_cause(&e);
        match e.kind() {
            Kind::Io | Kind::TimedOut | Kind::Dns | Kind::MaxReconnects
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "waiting for a NATS server to accept a connection");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Kind::Io | Kind::TimedOut | Kind::Dns | Kind::MaxReconnects => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to NATS at {list}: {cause} — is nats-server running there (and is --store the right address)?"
                )));
            }
            Kind::Authentication | Kind::AuthorizationViolation => {
                return Err(StoreError::Unavailable(format!(
                    "NATS at {list} refused this node's credentials: {cause}"
                )));
            }
            Kind::Tls => {
                return Err(StoreError::Unavailable(format!(
                    "TLS to NATS at {list} failed: {cause} — check --store-tls-* against the servers' TLS"
                )));
            }
            Kind::ServerParse => {
                return Err(StoreError::Invalid(format!(
                    "not a NATS server address: {list}: {cause}"
                )));
            }
        }
    }
}

/// The innermost cause of a connection error, in lower case without the OS error number
/// ("connection refused").
fn connect_cause(e: &async_nats::ConnectError) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let mut text = inner.to_string();
    if let Some(i) = text.find(" (os error") {
        text.truncate(i);
    }
    match text.chars().next() {
        Some(c) if c.is_uppercase() => c.to_lowercase().chain(text.chars().skip(1)).collect(),
        _ => text,
    }
}

/// Refuses servers that cannot hold the region's stream as asked: JetStream off, or more
/// replicas than a server that is not part of a cluster can keep. Each refusal names the fix.
async fn check_server(
    client: &async_nats::Client,
    js: &jetstream::Context,
    replicas: usize,
) -> StoreResult<()> {
    let info = client.server_info();
    let server = format!(
        "the NATS server {} at {}:{}",
        info.server_name, info.host, info.port
    );
    // The INFO of a server without JetStream says so; its account may still reach
    // JetStream elsewhere (a leafnode), which the account's JetStream info tells.
    if !info.jetstream
        && let Err(e) = js.query_account().await
    {
        return Err(StoreError::Unavailable(format!(
            "JetStream is not enabled on {server} ({e}): start nats-server with -js (or a jetstream {{}} block in its configuration)"
        )));
    }
    if replicas > 1 && info.cluster.is_none() {
        return Err(StoreError::Invalid(not_clustered(&server, replicas)));
    }
    Ok(())
}

fn not_clustered(server: &str, replicas: usize) -> String {
    format!(
        "{server} is not clustered, so it cannot keep the change log's {replicas} replicas: use --store-replicas 1 (one server, no redundancy), or run a cluster of at least {replicas} servers (see scripts/nats-cluster and deploy/nats)"
    )
}

/// The JetStream domain of the servers at `servers` (`None`: no domain configured), asked
/// before anything is created on them.
pub async fn server_domain(servers: &[String], tls: &NatsTls) -> StoreResult<Option<String>> {
    let client = first_connect(servers, tls).await?;
    let account = jetstream::new(client)
        .query_account()
        .await
        .map_err(unavailable)?;
    Ok(account.domain.filter(|d| !d.is_empty()))
}

/// Stream name of `region`.
pub fn stream_name(region: &str) -> String {
    let mut name = String::from("HAVEN_");
    for c in region.chars() {
        name.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
    }
    name
}

/// The region's change log as a JetStream stream: a [`SharedLog`] for [`ReplicatedStore`].
pub struct JetStreamLog {
    client: async_nats::Client,
    js: jetstream::Context,
    stream_name: String,
    prefix: String,
    /// Subject prefix of the JetStream API that serves the stream (`$JS.API` in this
    /// region's domain, `$JS.<domain>.API` for another region's).
    api_prefix: String,
    /// Another region's log, read through this region's connection: never appended to.
    peer: bool,
    /// Whether entries may be removed (why not, otherwise).
    can_remove: Result<(), String>,
}

/// How many single-entry removals are in flight at once.
const REMOVALS_IN_FLIGHT: usize = 64;
/// How many purges by subject are in flight at once.
const PURGES_IN_FLIGHT: usize = 8;
/// How long one removal request may take: a purge by subject on a stream of millions of
/// messages takes seconds, well past a client's default request timeout.
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A stream name that no stream has (`.` is not allowed in one).
const NO_STREAM: &str = "haven.start-up.probe";

/// What a probe of the stream (see [`stream_answers`]) heard.
#[derive(Debug, PartialEq)]
enum ProbeReply {
    /// The stream answered, refusing the probe: publishes through this connection reach it.
    Refused,
    /// The stream answered with another error than the one asked for (a limit reached, a
    /// sealed stream): it answers, and says what is wrong, which writes will say too.
    OtherError(String),
    /// The stream stored the probe (no server that Haven supports does): it answers.
    Stored(u64),
    /// Something else answered: not the stream.
    NotTheStream(String),
}

/// Reads the answer to a probe of `stream_name`.
fn probe_reply(payload: &[u8], stream_name: &str) -> ProbeReply {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    let said = || String::from_utf8_lossy(payload).into_owned();
    // A stream's answer names it (a refusal may not).
    let stream = v.get("stream").and_then(|s| s.as_str());
    if stream.is_some_and(|s| s != stream_name) {
        return ProbeReply::NotTheStream(said());
    }
    let code = v.pointer("/error/err_code").and_then(|c| c.as_u64());
    match (code, v.get("seq").and_then(|s| s.as_u64())) {
        (Some(10060), _) => ProbeReply::Refused,
        (Some(_), _) => ProbeReply::OtherError(said()),
        (None, Some(seq)) if stream.is_some() => ProbeReply::Stored(seq),
        _ => ProbeReply::NotTheStream(said()),
    }
}

/// Whether the region's stream answers a publish sent through `client`. The probe is a
/// publish on a key subject of the stream (one that writes use, so that a user allowed to
/// write may send it) that expects another stream's name: the stream's leader refuses it
/// before proposing it (`expected stream does not match`, 10060), so that nothing is stored.
/// Any answer of the stream proves that publishes reach its leader; "no responders" does not.
///
/// Only a clustered stream's leader subscribes to the stream's subjects; the other servers
/// learn of it over their routes. That window opens again at every later change of leader,
/// when a write may fail with "no responders" (nothing stored) as it would without a leader.
async fn stream_answers(
    client: &async_nats::Client,
    prefix: &str,
    stream_name: &str,
) -> Result<(), async_nats::RequestError> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Stream", NO_STREAM);
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(bytes::Bytes::new())
        .timeout(Some(Duration::from_secs(2)));
    let reply = client
        .send_request(format!("{prefix}.k.haven.start-up-probe"), request)
        .await?;
    match probe_reply(&reply.payload, stream_name) {
        ProbeReply::Refused => {}
        ProbeReply::OtherError(said) => {
            tracing::warn!(stream = %stream_name, answer = %said, "the change-log stream refuses publishes");
        }
        ProbeReply::Stored(seq) => {
            tracing::error!(stream = %stream_name, seq, "the change-log stream stored a start-up probe that it should have refused; followers skip it as not Haven's data");
        }
        ProbeReply::NotTheStream(said) => {
            tracing::warn!(stream = %stream_name, answer = %said, "something other than the change-log stream answers on its subjects");
        }
    }
    Ok(())
}

/// The JetStream backend: a [`ReplicatedStore`] on the region's stream.
pub type NatsStore = ReplicatedStore<JetStreamLog>;

impl ReplicatedStore<JetStreamLog> {
    /// Connects, creates the region's stream if missing, and builds the index from it.
    pub async fn open(
        config: &NatsConfig,
        origin: Origin,
        clock: Arc<HybridClock>,
    ) -> StoreResult<NatsStore> {
        let log = JetStreamLog::connect(config).await?;
        // Serve nothing until the index holds the whole stream as of now.
        ReplicatedStore::start(log, origin, clock, Duration::from_secs(60)).await
    }
}

impl JetStreamLog {
    /// Connects to the servers and creates the region's stream if it is missing.
    pub async fn connect(config: &NatsConfig) -> StoreResult<JetStreamLog> {
        if config.servers.is_empty() {
            return Err(StoreError::Invalid("no NATS server given".into()));
        }
        let client = first_connect(&config.servers, &config.tls).await?;
        let js = jetstream::new(client.clone());
        check_server(&client, &js, config.replicas).await?;
        let stream_name = stream_name(&config.region);
        let prefix = format!("hv.{}", token(&config.region));
        let stream_config = stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}.>")],
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            // Reclamation removes entries that hold nothing current (see `remove`).
            deny_delete: false,
            deny_purge: false,
            allow_direct: true,
            allow_atomic_publish: true,
            // No message carries a `Nats-Msg-Id`: a commit is never published twice (an
            // unknown outcome is reported, not retried), and every id would sit in each
            // server's duplicate table for the whole window, growing its memory with the write
            // rate.
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut can_remove = Ok(());
        // On a cluster that has just started, the servers answer only once they have elected
        // their leaders (the stream's, and on a new cluster the meta leader): seconds of
        // silence that deserve a line.
        tracing::info!(
            stream = %stream_name,
            replicas = config.replicas,
            "waiting for JetStream to find or create the change-log stream and elect its leader (a few seconds on a cluster that has just started; at most 30 s)"
        );
        loop {
            match js.get_or_create_stream(stream_config.clone()).await {
                Ok(s) => {
                    // A stream made by an older Haven denies removals: allow them.
                    let config = &s.cached_info().config;
                    if config.deny_delete || config.deny_purge {
                        let mut config = config.clone();
                        config.deny_delete = false;
                        config.deny_purge = false;
                        if let Err(e) = js.update_stream(config).await {
                            tracing::warn!(error = %e, stream = %stream_name, "the change-log stream denies removing entries; obsolete entries are kept");
                            can_remove = Err(format!(
                                "the stream {stream_name} denies removing messages and could not be changed: {e}"
                            ));
                        }
                    }
                    break;
                }
                // A server outside a cluster refuses replicas at once: waiting won't help.
                Err(e)
                    if matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED) =>
                {
                    let info = client.server_info();
                    return Err(StoreError::Invalid(not_clustered(
                        &format!(
                            "the NATS server {} at {}:{}",
                            info.server_name, info.host, info.port
                        ),
                        config.replicas,
                    )));
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "waiting for JetStream");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(unavailable(format!("creating stream {stream_name}: {e}"))),
            }
        }
        // A stream just created (by this node, or by one starting at the same time) elects
        // its leader first: wait for it (bounded), so that the node's first writes find one.
        loop {
            let led = match js.get_stream(&stream_name).await {
                Ok(s) => s
                    .cached_info()
                    .cluster
                    .as_ref()
                    .is_none_or(|c| c.leader.is_some()),
                Err(_) => false,
            };
            if led {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(stream = %stream_name, "the change-log stream has no leader yet; writes are refused until it has one");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A leader named in the stream's info does not yet mean that publishes reach it: the
        // server this node is connected to may not yet know of the leader's subscription to
        // the stream's subjects, and answers "no responders" meanwhile. Wait (bounded) until
        // the stream answers a publish through this connection. Only "no responders" is
        // waited out: a request that times out (the leader busy, or a user not allowed to
        // publish there, which the server does not answer) is not what this wait is for.
        while tokio::time::Instant::now() < deadline {
            match stream_answers(&client, &prefix, &stream_name).await {
                Ok(()) => break,
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    tracing::debug!("waiting for the change-log stream to answer publishes");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    tracing::warn!(stream = %stream_name, error = %e, "the change-log stream did not answer a probe; starting anyway");
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(stream = %stream_name, "publishes on the change-log stream's subjects find no responder yet; writes fail until they do");
            }
        }
        Ok(JetStreamLog {
            client,
            js,
            stream_name,
            prefix,
            api_prefix: "$JS.API".into(),
            peer: false,
            can_remove,
        })
    }

    /// The log of another region, `region`, whose JetStream domain is `domain`, read through
    /// this log's connection (the regions' servers are joined by leafnodes, each region its
    /// own domain). Read-only: it is followed and read, never appended to.
    pub fn peer(&self, region: &str, domain: &str) -> JetStreamLog {
        JetStreamLog {
            client: self.client.clone(),
            js: jetstream::with_domain(self.client.clone(), domain),
            stream_name: stream_name(region),
            prefix: format!("hv.{}", token(region)),
            api_prefix: format!("$JS.{domain}.API"),
            peer: true,
            can_remove: Err("another region's log is read-only here".into()),
        }
    }

    /// This process's presence on the log's connection (see [`crate::presence`]).
    pub fn presence(&self) -> Arc<NatsPresence> {
        Arc::new(NatsPresence::new(self.client.clone()))
    }

    fn subject(&self, change: &Change) -> String {
        self.subject_of(&change.subject())
    }

    fn subject_of(&self, subject: &LogSubject) -> String {
        match subject {
            LogSubject::Key(namespace, key) => {
                format!("{}.k.{}.{}", self.prefix, token(namespace), token(key))
            }
            LogSubject::Stream(stream) => format!("{}.e.{}", self.prefix, token(stream)),
        }
    }

    /// Fails at once while the client has no connection: a request would only wait for its
    /// timeout.
    fn connected(&self) -> Result<(), String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(format!("NATS: not connected ({state:?})")),
        }
    }

    /// The region's stream, asked of the server while connected: `get_stream` is one
    /// STREAM.INFO round trip, its answer the stream's cached info.
    async fn stream_info(&self) -> StoreResult<stream::Stream> {
        self.connected().map_err(StoreError::Unavailable)?;
        self.js
            .get_stream(&self.stream_name)
            .await
            .map_err(unavailable)
    }

    /// One removal request (`STREAM.MSG.DELETE` or `STREAM.PURGE`): how many entries it
    /// removed (0 for one already gone).
    async fn removal(&self, api: String, body: serde_json::Value) -> StoreResult<u64> {
        let request = async_nats::Request::new()
            .payload(body.to_string().into())
            .timeout(Some(REMOVAL_TIMEOUT));
        let reply = self
            .client
            .send_request(api, request)
            .await
            .map_err(|e| unavailable(format!("removing {body}: {e}")))?;
        let v: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| unavailable(format!("unreadable removal reply: {e}")))?;
        match v.get("error") {
            // A purge says how many it removed; a delete removed one.
            None => Ok(v.get("purged").and_then(|n| n.as_u64()).unwrap_or(1)),
            // 10057 (no message at that sequence) or 10043 (sequence not found): already
            // removed, by an earlier removal or a purge.
            Some(e)
                if matches!(
                    e.get("err_code").and_then(|c| c.as_u64()),
                    Some(10057 | 10043)
                ) =>
            {
                Ok(0)
            }
            Some(e) => Err(unavailable(format!("removing {body}: {e}"))),
        }
    }
}

#[async_trait]
impl SharedLog for JetStreamLog {
    async fn append(&self, writes: &[LogWrite]) -> Result<u64, AppendError> {
        if self.peer {
            return Err(AppendError::Unavailable(
                "another region's log is read-only here".into(),
            ));
        }
        self.connected().map_err(AppendError::Unavailable)?;
        let n = writes.len();
        let batch_id = hex::encode(rand::random::<[u8; 12]>());
        for (i, w) in writes.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if let Some(e) = w.expected {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    e.to_string().as_str(),
                );
            }
            if let Some(t) = &w.traceparent {
                headers.insert(TRACEPARENT_HEADER, t.as_str());
            }
            let payload = bytes::Bytes::from(
                postcard::to_stdvec(&w.change).expect("serializing to a Vec cannot fail"),
            );
            let subject = self.subject(&w.change);
            if i + 1 < n {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| AppendError::Unavailable(e.to_string()))?;
                continue;
            }
            headers.insert("Nats-Batch-Commit", "1");
            let reply = self
                .client
                .request_with_headers(subject, headers, payload)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        AppendError::Unavailable("no stream leader (no responders)".into())
                    }
                    async_nats::RequestErrorKind::TimedOut => {
                        AppendError::Unknown("the commit timed out".into())
                    }
                    _ => AppendError::Unavailable(e.to_string()),
                })?;
            return parse_ack(&reply.payload);
        }
        Err(AppendError::Unavailable("an empty batch".into()))
    }

    async fn last_seq(&self) -> StoreResult<u64> {
        let s = self.stream_info().await?;
        Ok(s.cached_info().state.last_sequence)
    }

    async fn follow(&self, from: u64) -> Result<DeliveryStream, String> {
        let stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        Ok(messages
            .map(|m| {
                let msg = m.map_err(|e| e.to_string())?;
                let seq = msg.info().map_err(|e| e.to_string())?.stream_sequence;
                let change = postcard::from_bytes::<Change>(&msg.payload).ok();
                let headers = msg.headers.as_ref();
                let batch_id = headers.and_then(|h| h.get("Nats-Batch-Id"));
                let commits = headers.and_then(|h| h.get("Nats-Batch-Commit")).is_some();
                let traceparent = headers
                    .and_then(|h| h.get(TRACEPARENT_HEADER))
                    .map(|v| v.as_str())
                    .filter(|t| t.len() <= crate::trace::MAX_TRACEPARENT)
                    .map(str::to_owned);
                Ok(Delivery {
                    seq,
                    change,
                    complete: batch_id.is_none() || commits,
                    batch: batch_id.map_or(0, |id| batch_number(id.as_str())),
                    traceparent,
                })
            })
            .boxed())
    }

    async fn read_log(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<LogEntry>> {
        self.connected().map_err(StoreError::Unavailable)?;
        let mut out = Vec::new();
        let mut next = from_seq.max(1);
        while out.len() < limit {
            let want = (limit - out.len()).min(1000);
            let subject = format!("{}.DIRECT.GET.{}", self.api_prefix, self.stream_name);
            let got = direct_batch(&self.client, &subject, next, want).await?;
            let Some(last) = got.last() else { break };
            next = last.seq + 1;
            let done = got.len() < want;
            out.extend(got);
            if done {
                break;
            }
        }
        Ok(out)
    }

    async fn check_writable(&self) -> StoreResult<()> {
        // The leader answers stream info only while the stream has a quorum.
        let s = self.stream_info().await?;
        let info = s.cached_info();
        if info.cluster.as_ref().is_some_and(|c| c.leader.is_none()) {
            return Err(StoreError::Unavailable(
                "the change-log stream has no leader".into(),
            ));
        }
        Ok(())
    }

    async fn describe(&self) -> serde_json::Value {
        let server = self.client.server_info();
        let mut out = serde_json::json!({
            "backend": "nats",
            "stream": self.stream_name,
            "connection": format!("{:?}", self.client.connection_state()),
            "connected_server": { "name": server.server_name, "host": server.host, "port": server.port, "version": server.version },
            "known_servers": server.connect_urls,
        });
        match self.js.get_stream(&self.stream_name).await {
            Ok(s) => {
                let info = s.cached_info();
                out["last_seq"] = info.state.last_sequence.into();
                // Fewer than `last_seq` once reclamation removed obsolete entries.
                out["messages"] = info.state.messages.into();
                out["bytes"] = info.state.bytes.into();
                if let Err(why) = &self.can_remove {
                    out["reclamation"] = why.as_str().into();
                }
                out["replicas"] = info.config.num_replicas.into();
                if let Some(c) = &info.cluster {
                    out["leader"] = serde_json::json!(c.leader);
                    out["peers"] = c
                        .replicas
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "name": p.name, "current": p.current,
                                // JetStream leaves `lag` out when it is 0.
                                "offline": p.offline, "lag": p.lag.unwrap_or(0),
                                "active_ms": p.active.as_millis() as u64,
                            })
                        })
                        .collect();
                }
            }
            Err(e) => out["error"] = e.to_string().into(),
        }
        out
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH_OPS
    }

    async fn remove(&self, removals: &[Removal]) -> StoreResult<u64> {
        self.can_remove.clone().map_err(StoreError::Invalid)?;
        self.connected().map_err(StoreError::Unavailable)?;
        let delete = format!("{}.STREAM.MSG.DELETE.{}", self.api_prefix, self.stream_name);
        let purge = format!("{}.STREAM.PURGE.{}", self.api_prefix, self.stream_name);
        // Purges by subject first, few at once (the server walks the subject's messages,
        // one at a time per stream), then single deletes, many at once.
        let (purges, deletes): (Vec<_>, Vec<_>) = removals
            .iter()
            .map(|r| match r {
                // `no_erase`: the message is dropped, not overwritten first.
                Removal::Entry(seq) => (
                    delete.clone(),
                    serde_json::json!({ "seq": seq, "no_erase": true }),
                ),
                // Every message on the subject below `below` (up to, not including it).
                Removal::Below { subject, below } => (
                    purge.clone(),
                    serde_json::json!({ "filter": self.subject_of(subject), "seq": below }),
                ),
                // Every message below `below` (whole blocks go at once).
                Removal::Prefix { below } => (purge.clone(), serde_json::json!({ "seq": below })),
            })
            .partition(|(api, _)| *api == purge);
        let mut removed = 0;
        for (requests, in_flight) in [(purges, PURGES_IN_FLIGHT), (deletes, REMOVALS_IN_FLIGHT)] {
            let results: Vec<StoreResult<u64>> = futures::stream::iter(requests)
                .map(|(api, body)| self.removal(api, body))
                .buffer_unordered(in_flight)
                .collect()
                .await;
            for r in results {
                removed += r?;
            }
        }
        Ok(removed)
    }

    async fn last_entry_of(&self, change: &Change) -> StoreResult<Option<LogEntry>> {
        self.connected().map_err(StoreError::Unavailable)?;
        let subject = format!("{}.DIRECT.GET.{}", self.api_prefix, self.stream_name);
        let body = serde_json::json!({ "last_by_subj": self.subject(change) }).to_string();
        let msg = tokio::time::timeout(COMMIT_TIMEOUT, self.client.request(subject, body.into()))
            .await
            .map_err(|_| unavailable("direct get timed out"))?
            .map_err(unavailable)?;
        if let Some(status) = msg.status {
            if status.as_u16() == 404 {
                return Ok(None);
            }
            return Err(unavailable(format!(
                "direct get answered {status}: {}",
                msg.description.unwrap_or_default()
            )));
        }
        let seq: u64 = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .and_then(|v| v.as_str().parse().ok())
            .ok_or_else(|| unavailable("direct get reply without Nats-Sequence"))?;
        let change: Change = postcard::from_bytes(&msg.payload)
            .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
        Ok(Some(LogEntry { seq, change }))
    }
}

/// A batch's number from its id (the first 16 hex digits of the random id).
fn batch_number(id: &str) -> u64 {
    u64::from_str_radix(id.get(..16).unwrap_or(id), 16)
        .unwrap_or(1)
        .max(1)
}

fn parse_ack(payload: &[u8]) -> Result<u64, AppendError> {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| AppendError::Unavailable(format!("unreadable stream reply: {e}")))?;
    if let Some(err) = v.get("error") {
        let code = err.get("err_code").and_then(|c| c.as_u64()).unwrap_or(0);
        let text = err
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_owned();
        return Err(match code {
            10071 | 10164 => AppendError::Conflict(text),
            10047 | 10077 | 10028 => AppendError::Full(text),
            _ => AppendError::Unavailable(format!("{text} (code {code})")),
        });
    }
    v.get("seq")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| AppendError::Unavailable(format!("stream reply without sequence: {v}")))
}

/// Reads up to `batch` messages from sequence `from` with one batched direct get.
async fn direct_batch(
    client: &async_nats::Client,
    subject: &str,
    from: u64,
    batch: usize,
) -> StoreResult<Vec<LogEntry>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(unavailable)?;
    let body = serde_json::json!({ "seq": from, "batch": batch }).to_string();
    client
        .publish_with_reply(subject.to_owned(), inbox, body.into())
        .await
        .map_err(unavailable)?;
    let mut out = Vec::with_capacity(batch);
    loop {
        let msg = match tokio::time::timeout(COMMIT_TIMEOUT, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(unavailable("direct get subscription closed")),
            Err(_) => return Err(unavailable("direct get timed out")),
        };
        if let Some(status) = msg.status {
            // 204: end of batch; 404: nothing at or after `from`.
            if status.as_u16() == 204 || status.as_u16() == 404 {
                break;
            }
            return Err(unavailable(format!(
                "direct get answered {status}: {}",
                msg.description.unwrap_or_default()
            )));
        }
        let headers = msg
            .headers
            .as_ref()
            .ok_or_else(|| unavailable("direct get reply without headers"))?;
        let seq: u64 = headers
            .get("Nats-Sequence")
            .and_then(|v| v.as_str().parse().ok())
            .ok_or_else(|| unavailable("direct get reply without Nats-Sequence"))?;
        let change: Change = postcard::from_bytes(&msg.payload)
            .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
        out.push(LogEntry { seq, change });
        if out.len() == batch {
            break;
        }
    }
    Ok(out)
}

/// Namespace, key or stream name of a subject this backend wrote (for diagnostics).
pub fn describe_subject(subject: &str) -> Option<String> {
    let mut parts = subject.split('.');
    let _hv = parts.next()?;
    let _region = parts.next()?;
    match parts.next()? {
        "k" => Some(format!(
            "record {}/{}",
            untoken(parts.next()?)?,
            untoken(parts.next()?)?
        )),
        "e" => Some(format!("stream {}", untoken(parts.next()?)?)),
        _ => None,
    }
}

/// The subject a process answers presence probes on: `hvp.<region>.<node>.<boot>`, outside
/// every stream's subjects (`hv.<region>.>`), so a probe is never stored.
fn presence_subject(region: &str, node: &str, boot: &str) -> String {
    format!("hvp.{}.{}.{}", token(region), token(node), token(boot))
}

/// How long this process's own connection must have stayed up, without reconnecting, before
/// its probes may find another process absent: a server that has just restarted (or that
/// this process has just moved to) may not yet know every subscription of the cluster.
const PRESENCE_STABLE: Duration = Duration::from_secs(3);

/// Presence on the JetStream backend's NATS connection (core NATS, not JetStream): a process
/// subscribes to its [`presence_subject`] and answers every request on it; a probe is a
/// request on that subject. NATS answers "no responders" at once when no subscription in the
/// whole NATS cluster would receive it — the process's connection is gone — and delivers it
/// otherwise, so that a paused process (whose connection the servers keep until it misses
/// their pings, minutes later) leaves the probe unanswered: [`Probe::Unknown`].
///
/// [`Probe::Unknown`]: crate::presence::Probe::Unknown
#[derive(Debug)]
pub struct NatsPresence {
    client: async_nats::Client,
    /// This connection's connect count when last looked at, and since when it is that.
    connects: parking_lot::Mutex<(u64, tokio::time::Instant)>,
}

impl NatsPresence {
    fn new(client: async_nats::Client) -> NatsPresence {
        let connects = client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        NatsPresence {
            client,
            connects: parking_lot::Mutex::new((connects, tokio::time::Instant::now())),
        }
    }

    /// Whether this process's own connection is up and has not reconnected for
    /// [`PRESENCE_STABLE`] (as far as the connect counter, read now, tells).
    fn settled(&self) -> bool {
        if !matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected
        ) {
            return false;
        }
        let now = tokio::time::Instant::now();
        let connects = self
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut seen = self.connects.lock();
        if seen.0 != connects {
            *seen = (connects, now);
        }
        now.duration_since(seen.1) >= PRESENCE_STABLE
    }
}

#[async_trait]
impl crate::presence::Presence for NatsPresence {
    async fn announce(&self, region: &str, node: &str, boot: &str) -> StoreResult<()> {
        let subject = presence_subject(region, node, boot);
        let mut sub = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| unavailable(format!("subscribing to {subject}: {e}")))?;
        // Make sure the servers have the subscription before the first heartbeat says that
        // this process answers.
        self.client
            .flush()
            .await
            .map_err(|e| unavailable(format!("subscribing to {subject}: {e}")))?;
        let client = self.client.clone();
        // The client resubscribes after every reconnection; the task lives as long as the
        // connection does.
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    let _ = client.publish(reply, bytes::Bytes::new()).await;
                }
            }
        });
        Ok(())
    }

    async fn probe(
        &self,
        region: &str,
        node: &str,
        boot: &str,
        timeout: Duration,
    ) -> crate::presence::Probe {
        use crate::presence::Probe;
        if !self.settled() {
            return Probe::Unknown;
        }
        let request = async_nats::Request::new()
            .payload(bytes::Bytes::new())
            .timeout(Some(timeout));
        let answer = self
            .client
            .send_request(presence_subject(region, node, boot), request)
            .await;
        match answer {
            Ok(_) => Probe::Present,
            // Only if this connection stayed the same throughout.
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders && self.settled() => {
                Probe::Absent
            }
            Err(_) => Probe::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_reply_is_read_as_the_streams_refusal_or_what_else_it_is() {
        let name = "HAVEN_R1";
        // What nats-server 2.12 answers.
        let refused = br#"{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"},"stream":"HAVEN_R1","seq":0}"#;
        assert_eq!(probe_reply(refused, name), ProbeReply::Refused);
        let unnamed = br#"{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}"#;
        assert_eq!(probe_reply(unnamed, name), ProbeReply::Refused);
        let limits = br#"{"stream":"HAVEN_R1","error":{"code":400,"err_code":10047,"description":"insufficient resources"}}"#;
        assert!(matches!(
            probe_reply(limits, name),
            ProbeReply::OtherError(_)
        ));
        let stored = br#"{"stream":"HAVEN_R1","seq":7}"#;
        assert_eq!(probe_reply(stored, name), ProbeReply::Stored(7));
        let other =
            br#"{"stream":"OTHER","error":{"code":400,"err_code":10060,"description":"x"}}"#;
        assert!(matches!(
            probe_reply(other, name),
            ProbeReply::NotTheStream(_)
        ));
        assert!(matches!(
            probe_reply(b"", name),
            ProbeReply::NotTheStream(_)
        ));
        assert!(matches!(
            probe_reply(br#"{"seq":3}"#, name),
            ProbeReply::NotTheStream(_)
        ));
    }
}
