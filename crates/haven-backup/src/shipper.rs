//! Continuous shipping: a task that reads the change log after what the backup already holds,
//! writes it to the target as sealed segments, takes a full snapshot at its own interval,
//! verifies the backup on a schedule and applies retention. It never blocks serving: when the
//! target is unreachable or full, shipping falls behind, the lag shows in its status, and it
//! catches up once the target is back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use haven_state::{EncodedEntry, PhysicalClock, Store};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::catalog::Catalog;
use crate::crypto::{self, BackupKey};
use crate::error::{BackupError, Result};
use crate::format;
use crate::manifest::{
    DEPLOYMENT_KEY, Deployment, FORMAT, GenerationInfo, ManifestEntry, ObjectKind, generation_key,
    segment_key, snapshot_key,
};
use crate::retention::{self, RetentionPolicy};
use crate::target::Target;
use crate::verify;

/// Most entries one segment holds; a long backlog ships as several segments.
const MAX_SEGMENT_ENTRIES: usize = 50_000;
/// Most payload bytes one segment holds (approximate).
const MAX_SEGMENT_BYTES: usize = 32 << 20;

/// Settings of continuous backup.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// Target URL.
    pub url: String,
    /// Encryption key.
    pub key: BackupKey,
    /// How often new changes are shipped as a segment.
    pub interval: Duration,
    /// How often a full snapshot is taken.
    pub snapshot_interval: Duration,
    /// How often the whole backup is verified.
    pub verify_interval: Duration,
    /// How often retention runs.
    pub prune_interval: Duration,
    /// What retention keeps.
    pub retention: RetentionPolicy,
    /// A label for an additional target of the same node (`None`: the main target). Each
    /// target ships under its own lease and generation record, named with the label.
    pub label: Option<String>,
}

impl BackupConfig {
    /// Defaults from the design: a segment every 60 s, a snapshot daily, verification
    /// weekly, retention hourly.
    pub fn new(url: impl Into<String>, key: BackupKey) -> BackupConfig {
        BackupConfig {
            url: url.into(),
            key,
            interval: Duration::from_secs(60),
            snapshot_interval: Duration::from_secs(24 * 3600),
            verify_interval: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
            retention: RetentionPolicy::default(),
            label: None,
        }
    }

    /// The name of a per-target record or file: `name`, followed by `-<label>` for an
    /// additional target.
    fn labelled(&self, name: &str) -> String {
        match &self.label {
            Some(l) => format!("{name}-{l}"),
            None => name.to_owned(),
        }
    }
}

/// Summary of the latest verification.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationSummary {
    /// When it finished, Unix milliseconds.
    pub at_millis: u64,
    /// Whether the backup was intact and continuous.
    pub ok: bool,
    /// Objects checked.
    pub objects: u64,
    /// Damaged objects and chain breaks found.
    pub problems: u64,
}

/// What the shipper reports: the figures operators watch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackupStatus {
    /// Target URL.
    pub target: String,
    /// Deployment id.
    pub deployment: String,
    /// Generation being shipped.
    pub generation: Option<String>,
    /// `ok`, `starting` or `failing`.
    pub state: String,
    /// The last error, while failing.
    pub last_error: Option<String>,
    /// Greatest change-log sequence the backup holds.
    pub shipped_seq: u64,
    /// Greatest sequence of the local change log.
    pub local_seq: u64,
    /// Entries not yet shipped.
    pub lag_entries: u64,
    /// Age of the oldest unshipped change, milliseconds (0 when nothing is pending).
    pub lag_millis: u64,
    /// When the last segment was written, Unix milliseconds.
    pub last_segment_millis: Option<u64>,
    /// When the last successful shipping round ended, Unix milliseconds.
    pub last_ship_millis: Option<u64>,
    /// When the last snapshot was written, Unix milliseconds.
    pub last_snapshot_millis: Option<u64>,
    /// Sequence of the last snapshot.
    pub last_snapshot_seq: Option<u64>,
    /// The latest verification.
    pub last_verification: Option<VerificationSummary>,
    /// When retention last ran, Unix milliseconds.
    pub last_prune_millis: Option<u64>,
    /// Segments written since start.
    pub segments_written: u64,
    /// Snapshots written since start.
    pub snapshots_written: u64,
    /// Bytes written since start.
    pub bytes_written: u64,
    /// Failed attempts since start, by kind.
    #[serde(default)]
    pub failures: BackupFailures,
}

/// Failed backup attempts since the shipper started (a node in standby fails none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFailures {
    /// Shipping rounds that failed other than while writing a snapshot (segments, the
    /// manifest, the target's checks).
    pub segment: u64,
    /// Shipping rounds that failed while writing a snapshot.
    pub snapshot: u64,
    /// Verifications that could not run or found damage or a break in the chain.
    pub verification: u64,
}

/// What one shipping round did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShipReport {
    /// Segments written.
    pub segments: u64,
    /// Entries shipped.
    pub entries: u64,
    /// Whether a snapshot was written.
    pub snapshot: bool,
    /// Greatest sequence the backup holds afterwards.
    pub shipped_seq: u64,
    /// Generation.
    pub generation: String,
    /// Sequence of the newest snapshot of the generation afterwards (written by this round
    /// or an earlier one).
    #[serde(default)]
    pub snapshot_seq: Option<u64>,
    /// When that snapshot was written, Unix milliseconds.
    #[serde(default)]
    pub snapshot_written_millis: Option<u64>,
    /// A snapshot was asked for but none written, and why (the newest snapshot already holds
    /// the current state: nothing was committed since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_skipped: Option<String>,
}

enum Command {
    Ship {
        snapshot: bool,
        reply: oneshot::Sender<std::result::Result<ShipReport, String>>,
    },
    Verify {
        reply: oneshot::Sender<std::result::Result<verify::VerifyReport, String>>,
    },
    Prune {
        reply: oneshot::Sender<std::result::Result<retention::RetentionReport, String>>,
    },
}

/// Handle of a running shipper.
#[derive(Clone)]
pub struct ShipperHandle {
    status: Arc<Mutex<BackupStatus>>,
    commands: mpsc::Sender<Command>,
    store: Arc<dyn Store>,
    clock: Arc<dyn PhysicalClock>,
}

impl ShipperHandle {
    /// The current status, with the lag measured now.
    pub async fn status(&self) -> BackupStatus {
        let mut s = self.status.lock().clone();
        if let Ok(local) = self.store.last_seq().await {
            s.local_seq = local;
            s.lag_entries = local.saturating_sub(s.shipped_seq);
            s.lag_millis = 0;
            if s.lag_entries > 0
                && let Ok(next) = self.store.read_log(s.shipped_seq + 1, 1).await
                && let Some(e) = next.first()
            {
                let at = e.change.version().hlc.millis();
                s.lag_millis = self.clock.now_millis().saturating_sub(at);
            }
        }
        s
    }

    /// Sends a command to the shipper task and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<std::result::Result<T, String>>) -> Command,
    ) -> std::result::Result<T, String> {
        let stopped = || "the backup shipper has stopped".to_owned();
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Ships everything committed so far (and a snapshot when `snapshot`), now.
    pub async fn ship_now(&self, snapshot: bool) -> std::result::Result<ShipReport, String> {
        self.ask(|reply| Command::Ship { snapshot, reply }).await
    }

    /// Applies retention now.
    pub async fn prune_now(&self) -> std::result::Result<retention::RetentionReport, String> {
        self.ask(|reply| Command::Prune { reply }).await
    }

    /// Verifies the whole backup now.
    pub async fn verify_now(&self) -> std::result::Result<verify::VerifyReport, String> {
        self.ask(|reply| Command::Verify { reply }).await
    }
}

/// Namespace and key of the deployment id in the store.
pub const DEPLOYMENT_NAMESPACE: &str = "system";
/// See [`DEPLOYMENT_NAMESPACE`].
pub const DEPLOYMENT_RECORD: &str = "deployment";
/// The generation a cluster ships (in the shared store, namespace
/// [`haven_cluster::regions::LOCAL_NS`]: each region ships its own), followed by `/<region>`.
pub const GENERATION_RECORD: &str = "backup-generation";
/// The shipping lease: one node per region ships at a time (namespace
/// [`haven_cluster::regions::LOCAL_NS`]), followed by `/<region>`.
pub const LEASE_RECORD: &str = "backup-lease";

fn region_key(store: &dyn Store, name: &str) -> String {
    format!("{name}/{}", store.origin().region)
}

/// The deployment id kept in the store, created on first use. It travels with the state
/// (replication, backup and restore), so a restored node keeps its deployment's identity.
pub async fn ensure_deployment(store: &dyn Store) -> Result<String> {
    if let Some(r) = store.get(DEPLOYMENT_NAMESPACE, DEPLOYMENT_RECORD).await? {
        return Ok(String::from_utf8_lossy(r.value()).into_owned());
    }
    let id = format!("dep-{}", hex::encode(rand::random::<[u8; 8]>()));
    let batch = haven_state::Batch::new().put_if(
        DEPLOYMENT_NAMESPACE,
        DEPLOYMENT_RECORD,
        id.clone().into_bytes(),
        haven_state::Expect::Absent,
    );
    match store.commit(batch).await {
        Ok(_) => Ok(id),
        Err(haven_state::StoreError::Conflict { .. }) => {
            let r = store.get(DEPLOYMENT_NAMESPACE, DEPLOYMENT_RECORD).await?;
            Ok(r.map(|r| String::from_utf8_lossy(r.value()).into_owned())
                .unwrap_or(id))
        }
        Err(e) => Err(e.into()),
    }
}

/// The generation a data directory ships, remembered in the data directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LocalGeneration {
    generation: String,
    target: String,
    deployment: String,
}

/// The shipper: one per node (per region, in cluster mode).
pub struct Shipper {
    store: Arc<dyn Store>,
    target: Target,
    config: BackupConfig,
    clock: Arc<dyn PhysicalClock>,
    state_file: PathBuf,
    status: Arc<Mutex<BackupStatus>>,
    deployment: String,
    /// Set once the target has been checked and the generation chosen.
    generation: Option<String>,
    shipped_seq: u64,
    last_snapshot_seq: Option<u64>,
    last_snapshot_created: Option<u64>,
    last_verify: Option<u64>,
    last_prune: Option<u64>,
    /// Manifest records read so far (retention lists the target, reads only what is new).
    manifests: crate::catalog::ManifestCache,
    /// The region's shipping lease, as this node's side of it (the holder is the node, not
    /// the process: a node that restarts takes its lease back at once).
    lease: haven_cluster::Lease,
    /// Whether this shipper held the lease at its last round.
    holding: bool,
    /// A snapshot is being written (still set when writing it failed).
    in_snapshot: bool,
}

impl Shipper {
    /// Opens the target (a bad URL fails here) and starts shipping in the background. The
    /// shipper remembers its generation in `data_dir`.
    pub async fn start(
        store: Arc<dyn Store>,
        config: BackupConfig,
        data_dir: &std::path::Path,
        clock: Arc<dyn PhysicalClock>,
    ) -> Result<ShipperHandle> {
        let target = Target::open(&config.url)?;
        let deployment = ensure_deployment(store.as_ref()).await?;
        // A backup of another deployment or under another key is refused now; an unreachable
        // target is not (shipping retries, and serving goes on).
        match tokio::time::timeout(Duration::from_secs(10), target.get(DEPLOYMENT_KEY)).await {
            Ok(Ok(Some(b))) => {
                if let Ok(d) = serde_json::from_slice::<Deployment>(&b) {
                    if d.id != deployment {
                        return Err(BackupError::OtherDeployment {
                            target: target.url().to_owned(),
                            expected: deployment,
                            found: d.id,
                        });
                    }
                    if d.key_fingerprint != config.key.fingerprint() {
                        return Err(BackupError::WrongKey {
                            target: target.url().to_owned(),
                            expected: d.key_fingerprint,
                            found: config.key.fingerprint(),
                        });
                    }
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the backup target is not reachable yet; shipping will retry")
            }
            Err(_) => {
                tracing::warn!("the backup target did not answer within 10 s; shipping will retry")
            }
        }
        let status = Arc::new(Mutex::new(BackupStatus {
            target: config.url.clone(),
            deployment: deployment.clone(),
            state: "starting".into(),
            ..BackupStatus::default()
        }));
        let (tx, rx) = mpsc::channel(16);
        let lease_ttl = (3 * config.interval).max(Duration::from_secs(10));
        let state_file = data_dir.join(format!("{}.json", config.labelled("backup-generation")));
        let lease_key = region_key(&*store, &config.labelled(LEASE_RECORD));
        let shipper = Shipper {
            store: store.clone(),
            target,
            config,
            clock: clock.clone(),
            state_file,
            status: status.clone(),
            deployment,
            generation: None,
            shipped_seq: 0,
            last_snapshot_seq: None,
            last_snapshot_created: None,
            last_verify: None,
            last_prune: None,
            manifests: Default::default(),
            lease: haven_cluster::Lease::new(
                store.clone(),
                haven_cluster::regions::LOCAL_NS,
                &lease_key,
                &store.origin().to_string(),
                lease_ttl,
            ),
            holding: false,
            in_snapshot: false,
        };
        tokio::spawn(shipper.run(rx));
        Ok(ShipperHandle {
            status,
            commands: tx,
            store,
            clock,
        })
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        // A first round at once (checks the target, starts or resumes the generation), then
        // one per interval.
        if let Err(e) = self.round(false).await {
            self.failed(&e);
        }
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.interval,
            self.config.interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.round(false).await {
                        self.failed(&e);
                    }
                    self.scheduled_work().await;
                }
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Ship { snapshot, reply }) => {
                        let r = self.round(snapshot).await;
                        if let Err(e) = &r {
                            self.failed(e);
                        }
                        let _ = reply.send(r.map_err(|e| e.to_string()));
                    }
                    Some(Command::Verify { reply }) => {
                        let r = self.verify().await;
                        let _ = reply.send(r.map_err(|e| e.to_string()));
                    }
                    Some(Command::Prune { reply }) => {
                        let r = self.prune().await;
                        let _ = reply.send(r.map_err(|e| e.to_string()));
                    }
                },
            }
        }
    }

    fn failed(&mut self, e: &BackupError) {
        let in_snapshot = std::mem::take(&mut self.in_snapshot);
        if matches!(e, BackupError::Standby(_)) {
            return;
        }
        let text = e.to_string();
        let mut s = self.status.lock();
        if in_snapshot {
            s.failures.snapshot += 1;
        } else {
            s.failures.segment += 1;
        }
        // Say it once, not every interval.
        if s.last_error.as_deref() != Some(text.as_str()) {
            tracing::warn!(error = %text, "backup shipping failed; will retry");
        }
        s.state = match e {
            BackupError::WrongKey { .. } | BackupError::OtherDeployment { .. } => "refused",
            _ => "failing",
        }
        .into();
        s.last_error = Some(text);
    }

    fn now(&self) -> u64 {
        self.clock.now_millis()
    }

    /// Checks the target belongs to this deployment and key, and picks the generation:
    /// the one remembered in the data directory if the backup still continues it, else a new
    /// one.
    async fn prepare(&mut self) -> Result<()> {
        if self.generation.is_some() {
            return Ok(());
        }
        self.claim_deployment().await?;
        let catalog = Catalog::load_cached(&self.target, &mut self.manifests).await?;
        let local_seq = self.store.last_seq().await?;
        let remembered = self.remembered_generation().await?;
        let continued = remembered
            .filter(|r| r.target == self.target.url() && r.deployment == self.deployment)
            .and_then(|r| catalog.generation(&r.generation).cloned())
            .filter(|g| !g.snapshots.is_empty() && g.resume_seq() <= local_seq);
        if let Some(g) = continued {
            // Resume right after the end of the chain of segments.
            self.shipped_seq = g.resume_seq();
            let last_snap = g.snapshots.last().expect("checked");
            self.last_snapshot_seq = Some(last_snap.last_seq);
            self.last_snapshot_created = Some(last_snap.created_millis);
            self.generation = Some(g.id.clone());
            tracing::info!(generation = %g.id, shipped_seq = self.shipped_seq, "resuming backup");
        } else {
            let id = format!(
                "{:012x}-{}",
                self.now(),
                hex::encode(rand::random::<[u8; 4]>())
            );
            let info = GenerationInfo {
                id: id.clone(),
                created_millis: self.now(),
                origin: self.store.origin().to_string(),
                start_seq: local_seq,
            };
            self.target
                .put(
                    &generation_key(&id),
                    serde_json::to_vec_pretty(&info).expect("json"),
                    None,
                )
                .await?;
            self.generation = Some(id.clone());
            self.shipped_seq = 0;
            self.last_snapshot_seq = None;
            self.last_snapshot_created = None;
            // A new generation starts with a snapshot of everything so far.
            self.snapshot(true).await?;
            tracing::info!(generation = %id, seq = self.shipped_seq, "started a new backup generation");
        }
        self.remember_generation().await?;
        if let Some(v) = verify::load_latest(&self.target).await? {
            self.last_verify = Some(v.checked_at_millis);
            self.status.lock().last_verification = Some(summary(&v));
        }
        let mut s = self.status.lock();
        s.generation = self.generation.clone();
        s.shipped_seq = self.shipped_seq;
        s.last_snapshot_seq = self.last_snapshot_seq;
        s.last_snapshot_millis = self.last_snapshot_created;
        Ok(())
    }

    /// Checks that the target belongs to this deployment and key (claiming an empty target).
    async fn claim_deployment(&self) -> Result<()> {
        let key = &self.config.key;
        match self.target.get(DEPLOYMENT_KEY).await? {
            Some(b) => {
                let d: Deployment =
                    serde_json::from_slice(&b).map_err(|e| BackupError::Damaged {
                        object: DEPLOYMENT_KEY.into(),
                        reason: format!("cannot parse: {e}"),
                    })?;
                if d.id != self.deployment {
                    return Err(BackupError::OtherDeployment {
                        target: self.target.url().to_owned(),
                        expected: self.deployment.clone(),
                        found: d.id,
                    });
                }
                if d.key_fingerprint != key.fingerprint() {
                    return Err(BackupError::WrongKey {
                        target: self.target.url().to_owned(),
                        expected: d.key_fingerprint,
                        found: key.fingerprint(),
                    });
                }
            }
            None => {
                let d = Deployment {
                    id: self.deployment.clone(),
                    format: FORMAT,
                    key_fingerprint: key.fingerprint(),
                    created_millis: self.now(),
                };
                self.target
                    .put(
                        DEPLOYMENT_KEY,
                        serde_json::to_vec_pretty(&d).expect("json"),
                        None,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// The generation this node (or, in a cluster, this region) last shipped, if recorded.
    async fn remembered_generation(&self) -> Result<Option<LocalGeneration>> {
        Ok(if self.store.shared() {
            // A cluster: the generation belongs to the region, whichever node ships it.
            self.store
                .get(
                    haven_cluster::regions::LOCAL_NS,
                    &region_key(&*self.store, &self.config.labelled(GENERATION_RECORD)),
                )
                .await?
                .and_then(|r| serde_json::from_slice(r.value()).ok())
        } else {
            std::fs::read(&self.state_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        })
    }

    /// Records the generation being shipped, for the next start (of any node of the region).
    async fn remember_generation(&self) -> Result<()> {
        let local = LocalGeneration {
            generation: self.generation.clone().expect("set"),
            target: self.target.url().to_owned(),
            deployment: self.deployment.clone(),
        };
        if self.store.shared() {
            self.store
                .commit(haven_state::Batch::new().put(
                    haven_cluster::regions::LOCAL_NS,
                    &region_key(&*self.store, &self.config.labelled(GENERATION_RECORD)),
                    serde_json::to_vec(&local).expect("json"),
                ))
                .await?;
        } else {
            haven_state::files::write_private(
                &self.state_file,
                &serde_json::to_vec_pretty(&local).expect("json"),
            )
            .map_err(|e| BackupError::io(format!("writing {}", self.state_file.display()), e))?;
        }
        Ok(())
    }

    /// One round: ship every committed change not yet shipped, then a snapshot when due.
    /// Takes or renews the region's shipping lease; `false` when another live shipper holds
    /// it. Another node takes the lease once it has seen it unrenewed for three rounds (at
    /// least 10 s) on its own clock, so a dead holder is replaced
    /// within that time and the new holder resumes from the manifest.
    async fn hold_lease(&mut self) -> Result<bool> {
        if !self.store.shared() {
            // One process owns an embedded store: nobody to share the work with.
            self.holding = true;
            return Ok(true);
        }
        match self.lease.hold().await? {
            haven_cluster::Holding::Held { taken } => {
                if taken || !self.holding {
                    tracing::info!("took the backup shipping lease");
                    // Whoever shipped before may have gone further: read the manifest again.
                    self.generation = None;
                    self.manifests = Default::default();
                }
                self.holding = true;
                Ok(true)
            }
            haven_cluster::Holding::Standby { holder } => {
                self.holding = false;
                let mut s = self.status.lock();
                s.state = "standby".into();
                s.last_error = Some(format!("{holder} ships for the region"));
                Ok(false)
            }
        }
    }

    async fn round(&mut self, force_snapshot: bool) -> Result<ShipReport> {
        self.in_snapshot = false;
        if !self.hold_lease().await? {
            self.holding = false;
            return Err(BackupError::Standby(
                "another node holds the region's backup lease and ships".into(),
            ));
        }
        if self.generation.is_some() && self.target.get(DEPLOYMENT_KEY).await?.is_none() {
            // The target was emptied or replaced: start over there (a new generation, whose
            // first snapshot holds everything).
            tracing::warn!(target = %self.target.url(), "the backup target lost its content; starting a new backup there");
            self.generation = None;
            self.manifests = Default::default();
        }
        self.prepare().await?;
        let generation = self.generation.clone().expect("prepared");
        let mut report = ShipReport {
            generation: generation.clone(),
            ..ShipReport::default()
        };
        self.ship_log(&generation, true, &mut report).await?;
        let due = self.last_snapshot_created.is_none_or(|at| {
            self.now().saturating_sub(at) >= self.config.snapshot_interval.as_millis() as u64
        });
        if (force_snapshot || due) && self.last_snapshot_seq != Some(self.shipped_seq)
            || self.last_snapshot_seq.is_none()
        {
            self.snapshot(false).await?;
            report.snapshot = true;
            // Changes committed while the snapshot was read also go out as segments, so
            // that every point stays restorable (the chain of segments has no hole).
            self.ship_log(&generation, false, &mut report).await?;
        } else if force_snapshot && !report.snapshot {
            // Another snapshot of the same sequence would replace the existing object under
            // its name (objects are named by sequence), and a crash between the object and
            // its manifest entry would leave a snapshot that fails verification: the one
            // there already is the snapshot of the current state.
            report.snapshot_skipped = Some(format!(
                "nothing was committed since the snapshot of sequence {}{}, which already holds the current state",
                self.shipped_seq,
                self.last_snapshot_created
                    .map(|t| format!(" (written {})", crate::fmt_millis(t)))
                    .unwrap_or_default()
            ));
        }
        report.shipped_seq = self.shipped_seq;
        report.snapshot_seq = self.last_snapshot_seq;
        report.snapshot_written_millis = self.last_snapshot_created;
        let now = self.now();
        let mut s = self.status.lock();
        s.state = "ok".into();
        s.last_error = None;
        s.shipped_seq = self.shipped_seq;
        s.last_ship_millis = Some(now);
        Ok(report)
    }

    /// Ships the log from after `shipped_seq` up to its current end as segments. A hole in the
    /// log (it was restored from a snapshot) is bridged with a snapshot, which holds the state
    /// at its end, when `bridge_holes` is set; otherwise shipping stops there.
    async fn ship_log(
        &mut self,
        generation: &str,
        bridge_holes: bool,
        report: &mut ShipReport,
    ) -> Result<()> {
        let until = self.store.last_seq().await?;
        while self.shipped_seq < until {
            // Copied as the store keeps them: a segment needs no entry decoded but its first
            // and last (for the times of its manifest entry).
            let entries = self
                .store
                .read_log_encoded(self.shipped_seq + 1, MAX_SEGMENT_ENTRIES)
                .await?;
            let Some(first) = entries.first() else { break };
            if first.seq != self.shipped_seq + 1 {
                if !bridge_holes {
                    break;
                }
                self.snapshot(true).await?;
                report.snapshot = true;
                continue;
            }
            let n = self.ship_segment(generation, entries).await?;
            report.segments += 1;
            report.entries += n;
        }
        Ok(())
    }

    /// Writes one segment from `entries` (contiguous, starting after `shipped_seq`), cut at
    /// the size limit; returns how many entries it holds.
    async fn ship_segment(
        &mut self,
        generation: &str,
        mut entries: Vec<EncodedEntry>,
    ) -> Result<u64> {
        // Cut at the byte limit (approximately: a sequence takes at most 10 bytes).
        let mut bytes = 0usize;
        let mut cut = entries.len();
        for (i, e) in entries.iter().enumerate() {
            bytes += e.change.len() + 10;
            if bytes > MAX_SEGMENT_BYTES && i > 0 {
                cut = i;
                break;
            }
        }
        entries.truncate(cut);
        let millis = |e: &EncodedEntry| {
            e.decode()
                .map(|d| d.change.version().hlc.millis())
                .map_err(|err| {
                    BackupError::State(haven_state::StoreError::Corrupt(format!(
                        "change-log entry {}: {err}",
                        e.seq
                    )))
                })
        };
        let (first, last) = match (entries.first(), entries.last()) {
            (Some(f), Some(l)) => (f, l),
            _ => unreachable!("a segment is shipped only with entries"),
        };
        let times = (millis(first)?, millis(last)?);
        let (first, last) = (first.seq, last.seq);
        let plain = format::encode_segment(first, last, &entries);
        let object = segment_key(generation, first, last);
        let entry = self
            .put_object(
                ObjectKind::Segment,
                generation,
                &object,
                (first, last),
                times,
                entries.len(),
                plain,
                false,
            )
            .await?;
        self.shipped_seq = last;
        let mut s = self.status.lock();
        s.segments_written += 1;
        s.bytes_written += entry.size;
        s.last_segment_millis = Some(entry.created_millis);
        s.shipped_seq = last;
        Ok(entries.len() as u64)
    }

    /// Writes a snapshot of the current state. With `bridge` (a new generation, or a hole in
    /// the local log) the chain continues after the snapshot; otherwise segments still cover
    /// everything up to it.
    async fn snapshot(&mut self, bridge: bool) -> Result<()> {
        self.in_snapshot = true;
        let generation = self.generation.clone().expect("prepared");
        let (seq, entries) = self.store.state_entries().await?;
        let plain = format::encode(ObjectKind::Snapshot, 0, seq, &entries);
        let object = snapshot_key(&generation, seq);
        // A snapshot's entries are in sequence order, not time order: its times span them all.
        let millis = entries.iter().map(|e| e.change.version().hlc.millis());
        let times = (millis.clone().min().unwrap_or(0), millis.max().unwrap_or(0));
        let entry = self
            .put_object(
                ObjectKind::Snapshot,
                &generation,
                &object,
                (0, seq),
                times,
                entries.len(),
                plain,
                bridge,
            )
            .await?;
        if bridge {
            self.shipped_seq = self.shipped_seq.max(seq);
        }
        self.last_snapshot_seq = Some(seq);
        self.last_snapshot_created = Some(entry.created_millis);
        let mut s = self.status.lock();
        s.snapshots_written += 1;
        s.bytes_written += entry.size;
        s.last_snapshot_millis = Some(entry.created_millis);
        s.last_snapshot_seq = Some(seq);
        s.shipped_seq = self.shipped_seq;
        self.in_snapshot = false;
        Ok(())
    }

    /// Seals and writes an object, then its manifest entry.
    #[allow(clippy::too_many_arguments)]
    async fn put_object(
        &self,
        kind: ObjectKind,
        generation: &str,
        object: &str,
        (first, last): (u64, u64),
        (first_millis, last_millis): (u64, u64),
        items: usize,
        plain: Vec<u8>,
        bridge: bool,
    ) -> Result<ManifestEntry> {
        let key = self.config.key.clone();
        let deployment = self.deployment.clone();
        let name = object.to_owned();
        let sealed =
            tokio::task::spawn_blocking(move || crypto::seal(&key, &deployment, &name, &plain))
                .await
                .map_err(|e| BackupError::Config(format!("sealing task failed: {e}")))??;
        let entry = ManifestEntry {
            kind,
            generation: generation.to_owned(),
            object: object.to_owned(),
            first_seq: first,
            last_seq: last,
            first_millis,
            last_millis,
            items: items as u64,
            size: sealed.len() as u64,
            sha256: crypto::sha256_hex(&sealed),
            created_millis: self.now(),
            storage_class: None,
            bridge,
        };
        self.target.put(object, sealed, None).await?;
        self.target
            .put(
                &entry.manifest_key(),
                serde_json::to_vec_pretty(&entry).expect("json"),
                None,
            )
            .await?;
        Ok(entry)
    }

    /// Verification and retention when they are due; failures are reported, not fatal.
    async fn scheduled_work(&mut self) {
        if self.generation.is_none() || !self.holding {
            return;
        }
        let now = self.now();
        let verify_due = self.last_verify.is_none_or(|at| {
            now.saturating_sub(at) >= self.config.verify_interval.as_millis() as u64
        });
        if verify_due && let Err(e) = self.verify().await {
            tracing::warn!(error = %e, "scheduled backup verification could not run");
        }
        let prune_due = self.last_prune.is_none_or(|at| {
            now.saturating_sub(at) >= self.config.prune_interval.as_millis() as u64
        });
        if prune_due {
            match self.prune().await {
                Ok(r) => {
                    if r.deleted + r.archived > 0 {
                        tracing::info!(
                            deleted = r.deleted,
                            archived = r.archived,
                            kept = r.kept,
                            "backup retention applied"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "backup retention could not run"),
            }
        }
    }

    /// [`Shipper::verify_once`], counting a verification that could not run or found damage
    /// (a node in standby verifies nothing and counts nothing).
    async fn verify(&mut self) -> Result<verify::VerifyReport> {
        let r = self.verify_once().await;
        // Whatever a failed preparation left set is not a snapshot failure.
        self.in_snapshot = false;
        let failed = match &r {
            Ok(report) => !report.ok,
            Err(e) => !matches!(e, BackupError::Standby(_)),
        };
        if failed {
            self.status.lock().failures.verification += 1;
        }
        r
    }

    async fn verify_once(&mut self) -> Result<verify::VerifyReport> {
        self.prepare().await?;
        let report = verify::verify(&self.target, &self.config.key, self.now(), &|_, _| {}).await?;
        verify::save(&self.target, &report).await?;
        if report.ok {
            tracing::info!(objects = report.objects, "backup verified");
        } else {
            tracing::error!(
                problems = report.problems.len(),
                gaps = report.gaps.len(),
                "backup verification found damage"
            );
        }
        self.last_verify = Some(report.checked_at_millis);
        self.status.lock().last_verification = Some(summary(&report));
        Ok(report)
    }

    async fn prune(&mut self) -> Result<retention::RetentionReport> {
        self.prepare().await?;
        let catalog = Catalog::load_cached(&self.target, &mut self.manifests).await?;
        let plan = retention::plan(&catalog, self.now(), &self.config.retention);
        let report =
            retention::apply(&self.target, &plan, &self.config.retention.archive_class).await?;
        self.last_prune = Some(self.now());
        self.status.lock().last_prune_millis = self.last_prune;
        Ok(report)
    }
}

fn summary(v: &verify::VerifyReport) -> VerificationSummary {
    VerificationSummary {
        at_millis: v.checked_at_millis,
        ok: v.ok,
        objects: v.objects,
        problems: (v.problems.len() + v.gaps.len()) as u64,
    }
}
