//! The embedded backend: one redb file, written by one thread that group-commits batches.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use redb::{
    BackendError, Database, Durability, ReadableDatabase, ReadableTable, StorageBackend,
    TableDefinition,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::clock::{Hlc, HybridClock};
use crate::record::{Change, EncodedEntry, LogEntry, Origin, Record, StoredRecord, StreamEvent};
use crate::store::{Batch, Commit, Reclaim, Reclaimed, ScanPage, Store, StoreError, StoreResult};
use crate::wal::Wal;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
/// (stream, index) -> change-log sequence of the event (the event itself is in the log).
const EVENTS: TableDefinition<(&str, u64), u64> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Greatest timestamp merged from elsewhere; local timestamps are recovered from the log's
/// last entry, so this is written only when a merge carries a newer clock.
const META_MAX_HLC: &str = "max_hlc";
/// Sequence the change log has reached even if its last entries are not stored: a restore from
/// a snapshot keeps only the entries still current, so the log's last key may be lower.
const META_LOG_FLOOR: &str = "log_floor";

/// Change-log entries below this sequence have been examined by reclamation: those not
/// current were removed, so a record or event superseded later has its entry removed at once.
const META_TRIMMED: &str = "trimmed_below";

/// Most batches one commit takes; bounds the latency one commit adds to the first of them.
const MAX_GROUP: usize = 512;
/// How long a read waits for the database to be reopened after an I/O error.
const REOPEN_WAIT: Duration = Duration::from_secs(3);
pub use crate::plan::MAX_VALUE_BYTES;

/// Opens the storage behind the database; called again to reopen after an I/O error.
pub type BackendFactory = Box<dyn Fn() -> std::io::Result<Box<dyn StorageBackend>> + Send + Sync>;

struct WriteRequest {
    batch: Batch,
    reply: oneshot::Sender<StoreResult<(Commit, Vec<Arc<LogEntry>>)>>,
}

/// What the writer thread does: commits, and reclamation steps between them.
enum Job {
    Write(WriteRequest),
    Reclaim(Reclaim, oneshot::Sender<StoreResult<Reclaimed>>),
}

/// The value stored in the `records` table: the record plus the revision that wrote it.
#[derive(serde::Serialize, serde::Deserialize)]
struct RecordRow {
    record: Record,
    revision: u64,
}

/// A [`RecordRow`] to encode, borrowing its record (the same bytes as `RecordRow`'s).
#[derive(serde::Serialize)]
struct RecordRowRef<'a> {
    record: &'a Record,
    revision: u64,
}

/// A [`RecordRow`] read without copying anything out of it, for its revision: the same
/// fields, borrowed from the stored bytes (postcard encodes fields in order, without names).
#[derive(serde::Deserialize)]
struct RowView<'a> {
    #[serde(borrow)]
    _record: RecordView<'a>,
    revision: u64,
}

/// [`Record`]'s fields, borrowed.
#[derive(serde::Deserialize)]
struct RecordView<'a> {
    _namespace: &'a str,
    _key: &'a str,
    _hlc: u64,
    _region: &'a str,
    _node: &'a str,
    _value: Option<&'a [u8]>,
    _expires_at_millis: Option<u64>,
}

/// The revision of a stored [`RecordRow`].
fn row_revision(bytes: &[u8]) -> StoreResult<u64> {
    postcard::from_bytes::<RowView<'_>>(bytes)
        .map(|row| row.revision)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Embedded, crash-safe store on a redb file.
pub struct RedbStore {
    origin: Origin,
    clock: Arc<HybridClock>,
    db: Arc<RwLock<Option<Arc<Database>>>>,
    writer: mpsc::Sender<Job>,
    /// The writer thread, joined when the store is dropped.
    thread: Option<std::thread::JoinHandle<()>>,
    feed: broadcast::Sender<Arc<LogEntry>>,
    path: Option<PathBuf>,
}

/// Dropping the store closes it: the writer finishes what is queued, checkpoints, and lets the
/// database go before `drop` returns, so that the data directory can be opened again (or
/// restored into) at once.
impl Drop for RedbStore {
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writer, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("origin", &self.origin)
            .field("path", &self.path)
            .finish()
    }
}

fn storage_err(e: impl std::fmt::Display) -> StoreError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("no space left")
        || lower.contains("quota")
        || lower.contains("file too large")
    {
        StoreError::Full(text)
    } else {
        StoreError::Unavailable(text)
    }
}

/// At most `limit` entries of the log from sequence `from_seq` on, each made by `entry` from
/// its sequence and its stored bytes.
fn log_range<T>(
    db: &Database,
    from_seq: u64,
    limit: usize,
    entry: impl Fn(u64, &[u8]) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let rx = db.begin_read().map_err(storage_err)?;
    let table = rx.open_table(LOG).map_err(storage_err)?;
    let mut out = Vec::new();
    for item in table.range(from_seq..).map_err(storage_err)? {
        if out.len() == limit {
            break;
        }
        let (k, v) = item.map_err(storage_err)?;
        out.push(entry(k.value(), v.value())?);
    }
    Ok(out)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Encodes `value` into `buf`, emptied first (so that one buffer serves a whole group).
fn encode_into<T: serde::Serialize>(value: &T, mut buf: Vec<u8>) -> Vec<u8> {
    buf.clear();
    postcard::to_extend(value, buf).expect("serializing to a Vec cannot fail")
}

fn open_database(factory: &BackendFactory) -> StoreResult<Database> {
    let backend = factory().map_err(storage_err)?;
    let db = redb::Builder::new()
        .create_with_backend(BoxedBackend(backend))
        .map_err(storage_err)?;
    if tables_exist(&db) {
        // Reopening (possibly on a full disk): no write needed.
        return Ok(db);
    }
    create_tables(&db)?;
    Ok(db)
}

/// Creates the (empty) tables of a new database, durably.
fn create_tables(db: &Database) -> StoreResult<()> {
    let mut tx = db.begin_write().map_err(storage_err)?;
    tx.set_durability(Durability::Immediate)
        .map_err(storage_err)?;
    {
        tx.open_table(LOG).map_err(storage_err)?;
        tx.open_table(RECORDS).map_err(storage_err)?;
        tx.open_table(EVENTS).map_err(storage_err)?;
        tx.open_table(META).map_err(storage_err)?;
    }
    tx.commit().map_err(storage_err)
}

/// Opens (creating it if need be, mode 0600) the database file at `path` as a redb file
/// backend.
pub fn open_file_backend(path: &Path) -> std::io::Result<redb::backends::FileBackend> {
    let f = crate::files::private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    redb::backends::FileBackend::new(f)
        .map_err(|e| std::io::Error::other(format!("cannot open {}: {e}", path.display())))
}

fn tables_exist(db: &Database) -> bool {
    let Ok(rx) = db.begin_read() else {
        return false;
    };
    rx.open_table(LOG).is_ok()
        && rx.open_table(RECORDS).is_ok()
        && rx.open_table(EVENTS).is_ok()
        && rx.open_table(META).is_ok()
}

/// Brings the views up to date with the write-ahead log (entries past the last checkpoint) and
/// starts a fresh log segment. Returns the last sequence, the greatest timestamp, and the log.
fn recover(db: &Database, wal_dir: Option<&Path>) -> StoreResult<(u64, Hlc, Option<Wal>)> {
    let Some(dir) = wal_dir else {
        let (last, hlc) = log_position(db)?;
        return Ok((last, hlc, None));
    };
    crate::files::private_dir(dir)
        .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
    let (mut last, _) = log_position(db)?;
    let entries = Wal::read_all(dir)?;
    let pending: Vec<_> = entries.into_iter().filter(|e| e.seq > last).collect();
    if !pending.is_empty() {
        let mut tx = db.begin_write().map_err(storage_err)?;
        tx.set_durability(Durability::Immediate)
            .map_err(storage_err)?;
        {
            let trimmed = trimmed_below(&tx)?;
            let mut tables = Tables {
                records: tx.open_table(RECORDS).map_err(storage_err)?,
                events: tx.open_table(EVENTS).map_err(storage_err)?,
                log: tx.open_table(LOG).map_err(storage_err)?,
                trimmed,
                newly_obsolete: Vec::new(),
                scratch: Vec::new(),
            };
            for e in &pending {
                if e.seq != last + 1 {
                    return Err(StoreError::Corrupt(format!(
                        "write-ahead log skips from sequence {last} to {}",
                        e.seq
                    )));
                }
                write_change(&mut tables, e.seq, &e.change)?;
                last = e.seq;
            }
        }
        tx.commit().map_err(storage_err)?;
        tracing::info!(
            entries = pending.len(),
            last_seq = last,
            "replayed the write-ahead log"
        );
    }
    let (last, hlc) = log_position(db)?;
    let wal = Wal::start(dir, last + 1)?;
    Ok((last, hlc, Some(wal)))
}

/// Writes one change to the log and its view. The entry it supersedes is removed from the
/// log at once when reclamation has already passed it.
fn write_change(tables: &mut Tables<'_>, seq: u64, change: &Change) -> StoreResult<()> {
    let mut buf = encode_into(change, std::mem::take(&mut tables.scratch));
    tables
        .log
        .insert(seq, buf.as_slice())
        .map_err(storage_err)?;
    let superseded = match change {
        Change::Record(r) => {
            buf = encode_into(
                &RecordRowRef {
                    record: r,
                    revision: seq,
                },
                buf,
            );
            let old = tables
                .records
                .insert((r.namespace.as_str(), r.key.as_str()), buf.as_slice())
                .map_err(storage_err)?;
            match old {
                Some(v) => Some(row_revision(v.value())?),
                None => None,
            }
        }
        Change::Event(e) => tables
            .events
            .insert((e.stream.as_str(), e.index), seq)
            .map_err(storage_err)?
            .map(|v| v.value()),
    };
    tables.scratch = buf;
    if let Some(old) = superseded {
        if old < tables.trimmed {
            tables.log.remove(old).map_err(storage_err)?;
        } else {
            tables.newly_obsolete.push(old);
        }
    }
    Ok(())
}

/// Where reclamation's pass over the change log is (see [`META_TRIMMED`]).
fn trimmed_below(tx: &redb::WriteTransaction) -> StoreResult<u64> {
    let meta = tx.open_table(META).map_err(storage_err)?;
    Ok(meta
        .get(META_TRIMMED)
        .map_err(storage_err)?
        .map_or(1, |v| v.value()))
}

/// The sequence of the last change-log entry and the greatest timestamp the store holds.
fn log_position(db: &Database) -> StoreResult<(u64, Hlc)> {
    let rx = db.begin_read().map_err(storage_err)?;
    let meta = rx.open_table(META).map_err(storage_err)?;
    let mut max = meta
        .get(META_MAX_HLC)
        .map_err(storage_err)?
        .map_or(0, |v| v.value());
    let floor = meta
        .get(META_LOG_FLOOR)
        .map_err(storage_err)?
        .map_or(0, |v| v.value());
    let log = rx.open_table(LOG).map_err(storage_err)?;
    let last = match log.last().map_err(storage_err)? {
        Some((k, v)) => {
            let change: Change = decode(v.value())?;
            max = max.max(change.version().hlc.0);
            k.value()
        }
        None => 0,
    };
    Ok((last.max(floor), Hlc(max)))
}

/// Adapter so that a boxed backend can be handed to redb, which takes `impl StorageBackend`.
#[derive(Debug)]
struct BoxedBackend(Box<dyn StorageBackend>);

impl StorageBackend for BoxedBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.0.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.0.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }
}

impl RedbStore {
    /// Opens (or creates) the store in directory `dir` (file `state.redb`), stamping local
    /// writes as `origin` with `clock`. The directory is private (0700) and so are its files
    /// (0600): an existing one that others may read is tightened (see [`crate::files`]).
    pub fn open(dir: &Path, origin: Origin, clock: Arc<HybridClock>) -> StoreResult<RedbStore> {
        crate::files::private_dir(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let file = dir.join("state.redb");
        crate::files::tighten_if_present(&file, crate::files::FILE_MODE).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot restrict {} to its owner: {e}",
                file.display()
            ))
        })?;
        let path = file.clone();
        let factory: BackendFactory = Box::new(move || {
            let backend = open_file_backend(&path)?;
            Ok(Box::new(backend) as Box<dyn StorageBackend>)
        });
        let mut store = RedbStore::open_with_wal(factory, Some(dir.join("wal")), origin, clock)?;
        store.path = Some(file);
        Ok(store)
    }

    /// Opens the store on storage made by `factory`, without a write-ahead log: every commit
    /// is a durable redb commit (tests use it to inject faults such as a full disk).
    pub fn open_with(
        factory: BackendFactory,
        origin: Origin,
        clock: Arc<HybridClock>,
    ) -> StoreResult<RedbStore> {
        RedbStore::open_with_wal(factory, None, origin, clock)
    }

    /// Opens the store on storage made by `factory`, with the write-ahead log in `wal_dir`
    /// when given (entries past the last checkpoint are replayed first).
    pub fn open_with_wal(
        factory: BackendFactory,
        wal_dir: Option<PathBuf>,
        origin: Origin,
        clock: Arc<HybridClock>,
    ) -> StoreResult<RedbStore> {
        let db = open_database(&factory)?;
        let (last_seq, max_hlc, wal) = recover(&db, wal_dir.as_deref())?;
        clock.observe(max_hlc);
        let db = Arc::new(RwLock::new(Some(Arc::new(db))));
        let (tx, rx) = mpsc::channel(4096);
        let (feed, _) = broadcast::channel(8192);
        let writer = Writer {
            db: db.clone(),
            factory,
            clock: clock.clone(),
            origin: origin.clone(),
            rx,
            last_seq,
            wal,
            commits_since_checkpoint: 0,
            last_checkpoint: std::time::Instant::now(),
            wal_failed: false,
            record_cursor: None,
            event_cursor: None,
            pass_finished: [false; 3],
            known_obsolete: BTreeSet::new(),
            scan_until: last_seq + 1,
        };
        let thread = std::thread::Builder::new()
            .name("haven-redb-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(RedbStore {
            origin,
            clock,
            db,
            writer: tx,
            thread: Some(thread),
            feed,
            path: None,
        })
    }

    /// Path of the database file, when it is a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The open database. After an I/O error the writer reopens it; readers wait a little for
    /// that instead of failing at once.
    async fn database(&self) -> StoreResult<Arc<Database>> {
        let deadline = tokio::time::Instant::now() + REOPEN_WAIT;
        loop {
            if let Some(db) = self.db.read().clone() {
                return Ok(db);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(
                    "the database is being reopened after an I/O error".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn read_row(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        let db = self.database().await?;
        let rx = db.begin_read().map_err(storage_err)?;
        let table = rx.open_table(RECORDS).map_err(storage_err)?;
        match table.get((namespace, key)).map_err(storage_err)? {
            None => Ok(None),
            Some(v) => {
                let row: RecordRow = decode(v.value())?;
                Ok(Some(StoredRecord {
                    record: row.record,
                    revision: row.revision,
                }))
            }
        }
    }
}

#[async_trait]
impl Store for RedbStore {
    fn origin(&self) -> &Origin {
        &self.origin
    }

    fn clock(&self) -> &Arc<HybridClock> {
        &self.clock
    }

    async fn get_raw(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        self.read_row(namespace, key).await
    }

    async fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ScanPage> {
        let now = self.clock.wall_millis();
        let db = self.database().await?;
        let rx = db.begin_read().map_err(storage_err)?;
        let table = rx.open_table(RECORDS).map_err(storage_err)?;
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut page = ScanPage::default();
        let range = table.range((namespace, start)..).map_err(storage_err)?;
        for item in range {
            let (k, v) = item.map_err(storage_err)?;
            let (ns, key) = k.value();
            if ns != namespace || !key.starts_with(prefix) {
                break;
            }
            if after == Some(key) {
                continue;
            }
            if page.records.len() == limit {
                page.next_after = page.records.last().map(|r| r.record.key.clone());
                break;
            }
            let row: RecordRow = decode(v.value())?;
            if row.record.is_live(now) {
                page.records.push(StoredRecord {
                    record: row.record,
                    revision: row.revision,
                });
            }
        }
        Ok(page)
    }

    async fn commit(&self, batch: Batch) -> StoreResult<Commit> {
        crate::plan::validate(&batch)?;
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Job::Write(WriteRequest { batch, reply }))
            .await
            .map_err(|_| StoreError::Closed)?;
        let (commit, entries) = rx.await.map_err(|_| StoreError::Closed)??;
        for e in entries {
            let _ = self.feed.send(e);
        }
        Ok(commit)
    }

    async fn read_events(
        &self,
        stream: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<StreamEvent>> {
        let db = self.database().await?;
        let rx = db.begin_read().map_err(storage_err)?;
        let table = rx.open_table(EVENTS).map_err(storage_err)?;
        let log = rx.open_table(LOG).map_err(storage_err)?;
        let mut out = Vec::new();
        let Some(from) = after.checked_add(1) else {
            return Ok(out);
        };
        for item in table
            .range((stream, from)..=(stream, u64::MAX))
            .map_err(storage_err)?
        {
            if out.len() == limit {
                break;
            }
            let (_, seq) = item.map_err(storage_err)?;
            out.push(event_at(&log, seq.value())?);
        }
        Ok(out)
    }

    async fn read_log(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<LogEntry>> {
        let db = self.database().await?;
        log_range(&db, from_seq, limit, |seq, bytes| {
            Ok(LogEntry {
                seq,
                change: decode(bytes)?,
            })
        })
    }

    async fn read_log_encoded(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<EncodedEntry>> {
        let db = self.database().await?;
        // The log keeps each change as `Change::encode` wrote it: copied, not decoded. Off the
        // async workers: a backup reads tens of thousands of entries at once.
        tokio::task::spawn_blocking(move || {
            log_range(&db, from_seq, limit, |seq, bytes| {
                Ok(EncodedEntry {
                    seq,
                    change: bytes.to_vec(),
                })
            })
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("reading the log failed: {e}")))?
    }

    async fn last_seq(&self) -> StoreResult<u64> {
        let db = self.database().await?;
        Ok(log_position(&db)?.0)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<LogEntry>> {
        self.feed.subscribe()
    }

    async fn reclaim(&self, reclaim: &Reclaim) -> StoreResult<Reclaimed> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Job::Reclaim(reclaim.clone(), reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn check_writable(&self) -> StoreResult<()> {
        // An empty batch still goes through the writer and a durable commit.
        self.commit(Batch::new()).await.map(|_| ())
    }

    async fn state_entries(&self) -> StoreResult<(u64, Vec<LogEntry>)> {
        let db = self.database().await?;
        tokio::task::spawn_blocking(move || {
            // One read transaction: the views and the log at one point.
            let rx = db.begin_read().map_err(storage_err)?;
            let records = rx.open_table(RECORDS).map_err(storage_err)?;
            let events = rx.open_table(EVENTS).map_err(storage_err)?;
            let log = rx.open_table(LOG).map_err(storage_err)?;
            let meta = rx.open_table(META).map_err(storage_err)?;
            let floor = meta
                .get(META_LOG_FLOOR)
                .map_err(storage_err)?
                .map_or(0, |v| v.value());
            let last = log
                .last()
                .map_err(storage_err)?
                .map_or(0, |(k, _)| k.value())
                .max(floor);
            let mut out = Vec::new();
            for item in records.iter().map_err(storage_err)? {
                let (_, v) = item.map_err(storage_err)?;
                let row: RecordRow = decode(v.value())?;
                out.push(LogEntry {
                    seq: row.revision,
                    change: Change::Record(row.record),
                });
            }
            for item in events.iter().map_err(storage_err)? {
                let (_, seq) = item.map_err(storage_err)?;
                let seq = seq.value();
                out.push(LogEntry {
                    seq,
                    change: Change::Event(event_at(&log, seq)?),
                });
            }
            out.sort_unstable_by_key(|e| e.seq);
            Ok((last, out))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("snapshot task failed: {e}")))?
    }
}

/// Whether a Haven process has the store in `dir` open right now (redb holds a lock on the
/// file while it is open).
pub fn data_dir_in_use(dir: &Path) -> bool {
    let file = dir.join("state.redb");
    if !file.exists() {
        return false;
    }
    match redb::Database::open(&file) {
        Ok(_) => false,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => true,
        Err(_) => false,
    }
}

/// Builds a new data directory from change-log entries with their original sequences (a
/// restore from backup). Entries must come in increasing sequence order; gaps are allowed
/// (a snapshot holds only the entries still current). The result opens as a [`RedbStore`]
/// whose change log continues after the last restored sequence.
pub struct Restorer {
    db: Database,
    last_seq: u64,
    max_hlc: u64,
    written: u64,
}

impl std::fmt::Debug for Restorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restorer")
            .field("last_seq", &self.last_seq)
            .field("written", &self.written)
            .finish()
    }
}

impl Restorer {
    /// Creates the store file in `dir`, which must not hold one yet.
    pub fn create(dir: &Path) -> StoreResult<Restorer> {
        crate::files::private_dir(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
        })?;
        let file = dir.join("state.redb");
        if file.exists() || dir.join("wal").exists() {
            return Err(StoreError::Invalid(format!(
                "{} already holds a Haven store",
                dir.display()
            )));
        }
        // Created empty and private first; redb initializes an empty file in place.
        crate::files::private_options()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", file.display()))
            })?;
        let db = redb::Builder::new().create(&file).map_err(storage_err)?;
        create_tables(&db)?;
        Ok(Restorer {
            db,
            last_seq: 0,
            max_hlc: 0,
            written: 0,
        })
    }

    /// Writes `entries` (increasing sequences, each above every earlier one) in one
    /// transaction. Made durable by [`Restorer::finish`].
    pub fn write(&mut self, entries: &[LogEntry]) -> StoreResult<()> {
        let mut tx = self.db.begin_write().map_err(storage_err)?;
        tx.set_durability(Durability::None).map_err(storage_err)?;
        let mut last = self.last_seq;
        let mut max_hlc = self.max_hlc;
        {
            let trimmed = trimmed_below(&tx)?;
            let mut tables = Tables {
                records: tx.open_table(RECORDS).map_err(storage_err)?,
                events: tx.open_table(EVENTS).map_err(storage_err)?,
                log: tx.open_table(LOG).map_err(storage_err)?,
                trimmed,
                newly_obsolete: Vec::new(),
                scratch: Vec::new(),
            };
            for e in entries {
                if e.seq <= last {
                    return Err(StoreError::Invalid(format!(
                        "restore entries out of order: {} after {last}",
                        e.seq
                    )));
                }
                write_change(&mut tables, e.seq, &e.change)?;
                last = e.seq;
                max_hlc = max_hlc.max(e.change.version().hlc.0);
            }
        }
        tx.commit().map_err(storage_err)?;
        self.last_seq = last;
        self.max_hlc = max_hlc;
        self.written += entries.len() as u64;
        Ok(())
    }

    /// Number of entries written.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Records that the log has reached `last_seq` (at least the last written entry) and the
    /// greatest timestamp seen, and makes everything durable.
    pub fn finish(self, last_seq: u64) -> StoreResult<u64> {
        let last = last_seq.max(self.last_seq);
        let mut tx = self.db.begin_write().map_err(storage_err)?;
        tx.set_durability(Durability::Immediate)
            .map_err(storage_err)?;
        {
            let mut meta = tx.open_table(META).map_err(storage_err)?;
            meta.insert(META_LOG_FLOOR, last).map_err(storage_err)?;
            meta.insert(META_MAX_HLC, self.max_hlc)
                .map_err(storage_err)?;
        }
        tx.commit().map_err(storage_err)?;
        Ok(last)
    }
}

struct Writer {
    db: Arc<RwLock<Option<Arc<Database>>>>,
    factory: BackendFactory,
    clock: Arc<HybridClock>,
    origin: Origin,
    rx: mpsc::Receiver<Job>,
    /// Sequence of the last committed change-log entry (only this thread writes).
    last_seq: u64,
    /// The write-ahead log, when commits to redb are not durable by themselves.
    wal: Option<Wal>,
    /// Commits since the views were last made durable.
    commits_since_checkpoint: u64,
    /// When the views were last made durable.
    last_checkpoint: std::time::Instant,
    /// Whether the last failed group failed in the write-ahead log (redb is then intact).
    wal_failed: bool,
    /// Where reclamation's pass over the records resumes (`None`: from the start).
    record_cursor: Option<(String, String)>,
    /// Where reclamation's pass over the stream events resumes.
    event_cursor: Option<(String, u64)>,
    /// Which of the pass's three parts (records, events, log) are finished: a finished part
    /// waits for the others, so that a pass ends.
    pass_finished: [bool; 3],
    /// Entries that stopped being current since the store was opened and are still in the
    /// log (at or above [`META_TRIMMED`] when they did): reclamation removes them without
    /// reading the log. At most [`MAX_KNOWN_OBSOLETE`].
    known_obsolete: BTreeSet<u64>,
    /// Entries below this sequence may have stopped being current before the store was
    /// opened (or while `known_obsolete` was full): reclamation finds those by reading the
    /// log from [`META_TRIMMED`] up to here.
    scan_until: u64,
}

/// Most obsolete entries remembered (about 40 bytes each); past it, reclamation reads the
/// log to find them, as after a restart.
const MAX_KNOWN_OBSOLETE: usize = 1 << 20;

/// A checkpoint is taken after this many commits…
const CHECKPOINT_COMMITS: u64 = 2000;
/// …or this much time…
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// …or this many bytes of write-ahead log, whichever comes first.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

type Applied = (Commit, Vec<Arc<LogEntry>>);

impl Writer {
    fn run(mut self) {
        let mut group: Vec<WriteRequest> = Vec::with_capacity(MAX_GROUP);
        loop {
            let healthy = self.db.read().is_some();
            let first = if healthy {
                match self.rx.blocking_recv() {
                    Some(r) => r,
                    None => {
                        self.checkpoint();
                        return;
                    }
                }
            } else {
                // The storage failed: keep trying to reopen it, and answer requests at once
                // (with an error if it is still down) rather than letting them wait.
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_millis(100));
                        let _ = self.reopen();
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            };
            // A reclamation step runs between groups of commits.
            let mut reclaim = None;
            match first {
                Job::Write(w) => group.push(w),
                Job::Reclaim(r, reply) => reclaim = Some((r, reply)),
            }
            while reclaim.is_none() && group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(Job::Write(w)) => group.push(w),
                    Ok(Job::Reclaim(r, reply)) => reclaim = Some((r, reply)),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit_group(&mut group);
            }
            if let Some((r, reply)) = reclaim {
                let _ = reply.send(self.reclaim(&r));
            }
        }
    }

    /// One bounded reclamation step, in one transaction (made durable like commits are):
    /// expired records and old tombstones, old stream events, and
    /// change-log entries below the floor that are no longer current. Each kind resumes
    /// where the previous step stopped.
    fn reclaim(&mut self, r: &Reclaim) -> StoreResult<Reclaimed> {
        let Some(db) = self.db.read().clone() else {
            return Err(StoreError::Unavailable(
                "the database is being reopened after an I/O error".into(),
            ));
        };
        let mut tx = db.begin_write().map_err(storage_err)?;
        let durability = if self.wal.is_some() {
            Durability::None
        } else {
            Durability::Immediate
        };
        tx.set_durability(durability).map_err(storage_err)?;
        let trimmed = trimmed_below(&tx)?;
        // Never the last entry: it tells a restarted store where the log is.
        let floor = r.log_floor.min(self.last_seq);
        let mut out = Reclaimed::default();
        let (records_done, events_done, log_done);
        let (removed_known, stays_obsolete);
        {
            let mut records = tx.open_table(RECORDS).map_err(storage_err)?;
            let mut events = tx.open_table(EVENTS).map_err(storage_err)?;
            let mut log = tx.open_table(LOG).map_err(storage_err)?;
            // An entry is removed from the log with its record or event when reclamation's
            // pass over the log is past it, or it is below the floor (otherwise it is
            // remembered, and removed once the floor is past it).
            let drop_entry =
                |log: &mut redb::Table<'_, u64, &'static [u8]>, stays: &mut Vec<u64>, seq: u64| {
                    if seq < trimmed || seq < floor {
                        log.remove(seq).map_err(storage_err)?;
                        return Ok::<u64, StoreError>(1);
                    }
                    stays.push(seq);
                    Ok(0)
                };
            let mut stays = Vec::new();

            // Expired records and old tombstones.
            let mut doomed = Vec::new();
            let mut examined = 0;
            let mut next_record = None;
            if !self.pass_finished[0] {
                let start = self.record_cursor.clone();
                let range = match &start {
                    Some((ns, key)) => records
                        .range((ns.as_str(), key.as_str())..)
                        .map_err(storage_err)?,
                    None => records.range::<(&str, &str)>(..).map_err(storage_err)?,
                };
                for item in range {
                    let (k, v) = item.map_err(storage_err)?;
                    let (ns, key) = k.value();
                    if examined == r.step {
                        next_record = Some((ns.to_owned(), key.to_owned()));
                        break;
                    }
                    examined += 1;
                    let row: RecordRow = decode(v.value())?;
                    let old = |retention: u64| {
                        row.record.version.hlc.millis().saturating_add(retention) < r.now_millis
                    };
                    let expired = row
                        .record
                        .expires_at_millis
                        .is_some_and(|at| at.saturating_add(r.expired_grace_millis) < r.now_millis);
                    // Not while its entry is the log's last (the log keeps that one).
                    if (expired || (row.record.is_tombstone() && old(r.tombstone_retention_millis)))
                        && row.revision != self.last_seq
                    {
                        doomed.push((ns.to_owned(), key.to_owned(), row.revision));
                    }
                }
            }
            for (ns, key, revision) in &doomed {
                records
                    .remove((ns.as_str(), key.as_str()))
                    .map_err(storage_err)?;
                out.log_entries += drop_entry(&mut log, &mut stays, *revision)?;
            }
            out.records = doomed.len() as u64;
            records_done = next_record.is_none();
            self.record_cursor = next_record;

            // Old stream events: a stream whose every event is old goes entirely (its next
            // append, if any, starts it again at index 1).
            let mut doomed = Vec::new();
            let mut examined = 0;
            let mut next_event = None;
            if !self.pass_finished[1] {
                let start = self.event_cursor.clone();
                let range = match &start {
                    Some((stream, index)) => events
                        .range((stream.as_str(), *index)..)
                        .map_err(storage_err)?,
                    None => events.range::<(&str, u64)>(..).map_err(storage_err)?,
                };
                for item in range {
                    let (k, seq) = item.map_err(storage_err)?;
                    let (stream, index) = k.value();
                    if examined == r.step {
                        next_event = Some((stream.to_owned(), index));
                        break;
                    }
                    examined += 1;
                    let seq = seq.value();
                    // Not while its entry is the log's last (the log keeps that one).
                    if seq == self.last_seq {
                        continue;
                    }
                    let event = event_at(&log, seq)?;
                    if event
                        .version
                        .hlc
                        .millis()
                        .saturating_add(r.event_retention_millis)
                        < r.now_millis
                    {
                        doomed.push((stream.to_owned(), index, seq));
                    }
                }
            }
            for (stream, index, seq) in &doomed {
                events
                    .remove((stream.as_str(), *index))
                    .map_err(storage_err)?;
                out.log_entries += drop_entry(&mut log, &mut stays, *seq)?;
            }
            out.events = doomed.len() as u64;
            events_done = next_event.is_none();
            self.event_cursor = next_event;

            // Change-log entries below the floor that are no longer current: those that may
            // have stopped being current before the store was opened are found by reading
            // the log (up to `scan_until`); later ones are known.
            let mut doomed = Vec::new();
            let mut reached = trimmed;
            let scan_end = floor.min(self.scan_until);
            let mut scanned = true;
            if scan_end > trimmed {
                let mut examined = 0;
                for item in log
                    .range(trimmed..scan_end)
                    .map_err(storage_err)?
                    .take(r.step)
                {
                    let (k, v) = item.map_err(storage_err)?;
                    let seq = k.value();
                    examined += 1;
                    reached = seq + 1;
                    let current = match decode::<Change>(v.value())? {
                        Change::Record(rec) => records
                            .get((rec.namespace.as_str(), rec.key.as_str()))
                            .map_err(storage_err)?
                            .map(|row| decode::<RecordRow>(row.value()))
                            .transpose()?
                            .is_some_and(|row| row.revision == seq),
                        Change::Event(e) => events
                            .get((e.stream.as_str(), e.index))
                            .map_err(storage_err)?
                            .is_some_and(|s| s.value() == seq),
                    };
                    if !current {
                        doomed.push(seq);
                    }
                }
                // Fewer than a step's worth left: the scan reached its end.
                scanned = examined < r.step;
                if scanned {
                    reached = scan_end;
                }
            }
            for seq in &doomed {
                log.remove(*seq).map_err(storage_err)?;
            }
            out.log_entries += doomed.len() as u64;
            let known: Vec<u64> = self
                .known_obsolete
                .range(..floor)
                .take(r.step)
                .copied()
                .collect();
            for seq in &known {
                if log.remove(*seq).map_err(storage_err)?.is_some() {
                    out.log_entries += 1;
                }
            }
            removed_known = known;
            // The pass reached the floor once the scan did and every known entry below it
            // is gone. [`META_TRIMMED`] never passes a known entry still in the log: after a
            // restart only the scan finds it.
            let left = self
                .known_obsolete
                .range(..floor)
                .nth(removed_known.len())
                .copied();
            log_done = scanned && left.is_none();
            if log_done {
                reached = reached.max(floor);
            }
            if let Some(seq) = left {
                reached = reached.min(seq);
            }
            stays_obsolete = stays;
            let mut meta = tx.open_table(META).map_err(storage_err)?;
            if reached > trimmed {
                meta.insert(META_TRIMMED, reached).map_err(storage_err)?;
            }
        }
        if let Err(e) = tx.commit() {
            // What it remembered may be gone from the log or not: read the log instead.
            self.forget_known_obsolete();
            return Err(storage_err(e));
        }
        self.commits_since_checkpoint += 1;
        for seq in &removed_known {
            self.known_obsolete.remove(seq);
        }
        self.remember_obsolete(stays_obsolete);
        let finished = &mut self.pass_finished;
        finished[0] |= records_done;
        finished[1] |= events_done;
        finished[2] |= log_done;
        out.done = finished.iter().all(|f| *f);
        if out.done {
            self.pass_finished = [false; 3];
        }
        Ok(out)
    }

    fn commit_group(&mut self, group: &mut Vec<WriteRequest>) {
        let current = self.db.read().clone();
        let db = match current {
            Some(db) => db,
            None => match self.reopen() {
                Ok(db) => db,
                Err(e) => {
                    for r in group.drain(..) {
                        let _ = r.reply.send(Err(StoreError::Unavailable(e.to_string())));
                    }
                    return;
                }
            },
        };
        let result = self.apply_group(&db, group);
        match result {
            Ok(results) => {
                for (r, res) in group.drain(..).zip(results) {
                    let _ = r.reply.send(res);
                }
                if self.wal.as_ref().is_some_and(|w| {
                    self.commits_since_checkpoint >= CHECKPOINT_COMMITS
                        || w.len() >= CHECKPOINT_BYTES
                        || self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                }) {
                    self.checkpoint();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; no write of this group was acknowledged");
                // A failed append to the write-ahead log leaves redb untouched (the transaction
                // was aborted); any other I/O failure latches redb until it is reopened.
                let failure_is_io = matches!(e, StoreError::Full(_) | StoreError::Unavailable(_))
                    && !self.wal_failed;
                self.wal_failed = false;
                for r in group.drain(..) {
                    let _ = r.reply.send(Err(clone_err(&e)));
                }
                if failure_is_io {
                    // redb latches I/O failures; reopen (with repair) to recover.
                    *self.db.write() = None;
                    drop(db);
                    if let Err(e) = self.reopen() {
                        tracing::error!(error = %e, "reopening the database failed; will retry");
                    }
                }
            }
        }
    }

    /// Makes the views durable and starts a new write-ahead log segment (dropping the old
    /// ones, whose entries the views now hold). On failure the log is kept as it is.
    fn checkpoint(&mut self) {
        let Some(wal) = &self.wal else { return };
        if self.commits_since_checkpoint == 0 {
            return;
        }
        let Some(db) = self.db.read().clone() else {
            return;
        };
        let durable = db.begin_write().map_err(storage_err).and_then(|mut tx| {
            tx.set_durability(Durability::Immediate)
                .map_err(storage_err)?;
            tx.commit().map_err(storage_err)
        });
        if let Err(e) = durable {
            tracing::warn!(error = %e, "checkpoint failed; the write-ahead log is kept");
            return;
        }
        match Wal::start(wal.dir(), self.last_seq + 1) {
            Ok(w) => {
                self.wal = Some(w);
                self.commits_since_checkpoint = 0;
                self.last_checkpoint = std::time::Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "starting a new write-ahead log segment failed"),
        }
    }

    /// Remembers entries that a committed transaction made obsolete.
    fn remember_obsolete(&mut self, seqs: Vec<u64>) {
        if self.known_obsolete.len() + seqs.len() > MAX_KNOWN_OBSOLETE {
            self.forget_known_obsolete();
            return;
        }
        self.known_obsolete.extend(seqs);
    }

    /// Forgets which entries are obsolete: reclamation reads the log up to here to find them.
    fn forget_known_obsolete(&mut self) {
        self.known_obsolete.clear();
        self.scan_until = self.last_seq + 1;
    }

    /// One attempt to reopen the database (redb must be reopened after an I/O error).
    fn reopen(&mut self) -> StoreResult<Arc<Database>> {
        let db = Arc::new(open_database(&self.factory)?);
        let wal_dir = self.wal.as_ref().map(|w| w.dir().to_owned());
        let (last, _, wal) = recover(&db, wal_dir.as_deref())?;
        self.last_seq = last;
        if wal.is_some() {
            self.wal = wal;
        }
        self.commits_since_checkpoint = 0;
        self.forget_known_obsolete();
        *self.db.write() = Some(db.clone());
        tracing::info!("the database was reopened after a storage error");
        Ok(db)
    }

    fn apply_group(
        &mut self,
        db: &Database,
        group: &[WriteRequest],
    ) -> StoreResult<Vec<StoreResult<Applied>>> {
        let mut tx = db.begin_write().map_err(storage_err)?;
        // With a write-ahead log the log's fsync is the durable step; the views follow cheaply.
        let durability = if self.wal.is_some() {
            Durability::None
        } else {
            Durability::Immediate
        };
        tx.set_durability(durability).map_err(storage_err)?;
        let mut results = Vec::with_capacity(group.len());
        let mut last_seq = self.last_seq;
        let mut merged_hlc = 0u64;
        let newly_obsolete;
        {
            let trimmed = trimmed_below(&tx)?;
            let mut tables = Tables {
                records: tx.open_table(RECORDS).map_err(storage_err)?,
                events: tx.open_table(EVENTS).map_err(storage_err)?,
                log: tx.open_table(LOG).map_err(storage_err)?,
                trimmed,
                newly_obsolete: Vec::new(),
                scratch: Vec::new(),
            };
            for req in group {
                results.push(self.apply_batch(
                    &mut tables,
                    &req.batch,
                    &mut last_seq,
                    &mut merged_hlc,
                )?);
            }
            newly_obsolete = std::mem::take(&mut tables.newly_obsolete);
            if merged_hlc > 0 {
                let mut meta = tx.open_table(META).map_err(storage_err)?;
                let stored = meta
                    .get(META_MAX_HLC)
                    .map_err(storage_err)?
                    .map_or(0, |v| v.value());
                if merged_hlc > stored {
                    meta.insert(META_MAX_HLC, merged_hlc).map_err(storage_err)?;
                }
            }
        }
        let mut logged = 0;
        if let Some(wal) = &mut self.wal {
            let entries: Vec<Arc<LogEntry>> = results
                .iter()
                .flatten()
                .flat_map(|(_, entries)| entries.iter().cloned())
                .collect();
            match wal.append(&entries) {
                Ok(n) => logged = n,
                Err(e) => {
                    let _ = tx.abort();
                    self.wal_failed = true;
                    return Err(e);
                }
            }
        }
        if let Err(e) = tx.commit() {
            if let Some(wal) = &mut self.wal {
                wal.undo(logged);
            }
            return Err(storage_err(e));
        }
        self.last_seq = last_seq;
        self.commits_since_checkpoint += 1;
        self.remember_obsolete(newly_obsolete);
        for r in results.iter_mut().flatten() {
            r.0.last_seq = last_seq;
        }
        Ok(results)
    }

    /// Applies one batch inside the group's transaction. Returns `Ok(Err(..))` when the batch's
    /// preconditions fail (the batch is skipped, the group goes on) and `Err(..)` on storage
    /// errors (the whole group fails).
    fn apply_batch(
        &self,
        tables: &mut Tables<'_>,
        batch: &Batch,
        last_seq: &mut u64,
        merged_hlc: &mut u64,
    ) -> StoreResult<StoreResult<Applied>> {
        let now = self.clock.wall_millis();
        let plan = match crate::plan::plan(&*tables, batch, &self.clock, &self.origin, now) {
            Ok(p) => p,
            Err(e @ (StoreError::Conflict { .. } | StoreError::Invalid(_))) => return Ok(Err(e)),
            Err(e) => return Err(e),
        };
        *merged_hlc = (*merged_hlc).max(plan.merged_hlc);
        let first = *last_seq + 1;
        let outcomes = plan.outcomes(first);
        let mut entries = Vec::with_capacity(plan.writes.len());
        for w in plan.writes {
            *last_seq += 1;
            write_change(tables, *last_seq, &w.change)?;
            entries.push(Arc::new(LogEntry {
                seq: *last_seq,
                change: w.change,
            }));
        }
        Ok(Ok((
            Commit {
                last_seq: *last_seq,
                outcomes,
            },
            entries,
        )))
    }
}

/// The tables a commit writes, opened once per group.
struct Tables<'txn> {
    records: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    events: redb::Table<'txn, (&'static str, u64), u64>,
    log: redb::Table<'txn, u64, &'static [u8]>,
    /// [`META_TRIMMED`] when the transaction began.
    trimmed: u64,
    /// Entries this transaction superseded that stay in the log for now (reclamation
    /// removes them once every reader is past them).
    newly_obsolete: Vec<u64>,
    /// Where the values written are encoded, reused from one write to the next.
    scratch: Vec<u8>,
}

impl crate::plan::StateRead for Tables<'_> {
    fn record(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        match self.records.get((namespace, key)).map_err(storage_err)? {
            None => Ok(None),
            Some(v) => {
                let row: RecordRow = decode(v.value())?;
                Ok(Some(StoredRecord {
                    record: row.record,
                    revision: row.revision,
                }))
            }
        }
    }

    fn stream_head(&self, stream: &str) -> StoreResult<(u64, u64)> {
        let mut range = self
            .events
            .range((stream, 0)..=(stream, u64::MAX))
            .map_err(storage_err)?;
        match range.next_back() {
            Some(item) => {
                let (k, seq) = item.map_err(storage_err)?;
                Ok((k.value().1, seq.value()))
            }
            None => Ok((0, 0)),
        }
    }

    fn event(&self, stream: &str, index: u64) -> StoreResult<Option<StreamEvent>> {
        match self.events.get((stream, index)).map_err(storage_err)? {
            Some(seq) => Ok(Some(event_at(&self.log, seq.value())?)),
            None => Ok(None),
        }
    }
}

/// The event stored at change-log sequence `seq`.
fn event_at(log: &impl ReadableTable<u64, &'static [u8]>, seq: u64) -> StoreResult<StreamEvent> {
    let entry = log.get(seq).map_err(storage_err)?.ok_or_else(|| {
        StoreError::Corrupt(format!("event index points at missing log entry {seq}"))
    })?;
    match decode::<Change>(entry.value())? {
        Change::Event(e) => Ok(e),
        Change::Record(_) => Err(StoreError::Corrupt(format!(
            "log entry {seq} is not an event"
        ))),
    }
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Full(s) => StoreError::Full(s.clone()),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
        StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        StoreError::Closed => StoreError::Closed,
        StoreError::Conflict {
            namespace,
            key,
            expected,
            found,
        } => StoreError::Conflict {
            namespace: namespace.clone(),
            key: key.clone(),
            expected: expected.clone(),
            found: found.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::record::{Origin, Version};

    fn row(value: Option<Vec<u8>>, expires_at_millis: Option<u64>) -> RecordRow {
        RecordRow {
            record: Record {
                namespace: "notes".into(),
                key: "a/ключ".into(),
                version: Version {
                    hlc: Hlc(u64::MAX - 7),
                    origin: Origin {
                        region: "eu-west".into(),
                        node: "node-1".into(),
                    },
                },
                value,
                expires_at_millis,
            },
            revision: 1 << 40,
        }
    }

    #[test]
    fn a_row_encoded_from_a_borrowed_record_is_the_row_and_its_revision_reads_back() {
        for r in [
            row(Some(b"value".repeat(100)), Some(12_345)),
            row(None, None),
            row(Some(Vec::new()), None),
        ] {
            let owned = postcard::to_stdvec(&r).unwrap();
            let borrowed = encode_into(
                &RecordRowRef {
                    record: &r.record,
                    revision: r.revision,
                },
                vec![1, 2, 3],
            );
            assert_eq!(owned, borrowed);
            assert_eq!(row_revision(&owned).unwrap(), r.revision);
        }
        assert!(matches!(row_revision(&[0xff]), Err(StoreError::Corrupt(_))));
    }
}
