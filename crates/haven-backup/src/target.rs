//! Where backups go: an object store reached through the `object_store` crate, either a local
//! directory or an S3-compatible bucket.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload,
};

use crate::error::{BackupError, Result};

/// At most this many reads of single objects of a local directory at a time (see
/// [`Target::reads_in_flight`]).
pub(crate) const LOCAL_READS_IN_FLIGHT: usize = 2;

/// What kind of storage a target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// A directory on a local (or mounted) file system.
    Local,
    /// An S3-compatible bucket.
    S3,
}

/// One object listed under a target.
#[derive(Clone, Debug)]
pub struct Listed {
    /// Key relative to the target's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, Unix milliseconds.
    pub modified_millis: u64,
}

/// A backup target: an object store and a prefix inside it.
#[derive(Clone)]
pub struct Target {
    store: Arc<dyn ObjectStore>,
    /// The same store when it is a local directory, for reads done in one blocking task.
    local: Option<Arc<LocalFileSystem>>,
    prefix: String,
    url: String,
    kind: TargetKind,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).finish()
    }
}

impl Target {
    /// Opens the target named by `url`: `s3://bucket[/prefix]` (endpoint, region and
    /// credentials from the usual `AWS_*` environment variables), `file:///abs/dir`, or a plain
    /// directory path. A local directory is created if missing.
    pub fn open(url: &str) -> Result<Target> {
        let url = url.trim();
        if url.is_empty() {
            return Err(BackupError::Config("the backup URL is empty".into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(BackupError::Config(format!(
                    "invalid backup URL {url:?}: expected s3://BUCKET[/PREFIX]"
                )));
            }
            // Bounded retries: an unreachable store makes a shipping round fail within seconds
            // (the next round retries) instead of holding it for minutes.
            let retry = object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(10),
                ..Default::default()
            };
            let options = object_store::ClientOptions::new()
                .with_connect_timeout(std::time::Duration::from_secs(5))
                .with_timeout(std::time::Duration::from_secs(120));
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .with_client_options(options);
            let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                .iter()
                .find_map(|k| std::env::var(k).ok());
            if endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
            {
                builder = builder.with_allow_http(true);
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            let store = builder.build().map_err(|e| {
                BackupError::Config(format!("cannot use the backup URL {url:?}: {e}"))
            })?;
            return Ok(Target {
                store: Arc::new(store),
                local: None,
                prefix: normalize_prefix(prefix),
                url: url.to_owned(),
                kind: TargetKind::S3,
            });
        }
        let dir = if let Some(rest) = url.strip_prefix("file://") {
            std::path::PathBuf::from(rest)
        } else if url.contains("://") {
            return Err(BackupError::Config(format!(
                "unsupported backup URL {url:?}: use s3://BUCKET/PREFIX, file:///DIR or a directory path"
            )));
        } else {
            std::path::PathBuf::from(url)
        };
        std::fs::create_dir_all(&dir).map_err(|e| {
            BackupError::io(
                format!("creating the backup directory {}", dir.display()),
                e,
            )
        })?;
        let store = Arc::new(LocalFileSystem::new_with_prefix(&dir).map_err(|e| {
            BackupError::Config(format!(
                "cannot use the backup directory {}: {e}",
                dir.display()
            ))
        })?);
        Ok(Target {
            store: store.clone(),
            local: Some(store),
            prefix: String::new(),
            url: url.to_owned(),
            kind: TargetKind::Local,
        })
    }

    /// An empty in-memory target (the fuzz targets' stand-in for a bucket).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn in_memory() -> Target {
        Target {
            store: Arc::new(object_store::memory::InMemory::new()),
            local: None,
            prefix: String::new(),
            url: "memory://".into(),
            kind: TargetKind::Local,
        }
    }

    /// Opens an existing target for reading: like [`Target::open`], but a local directory
    /// that does not exist is an error instead of being created.
    pub fn open_existing(url: &str) -> Result<Target> {
        let u = url.trim();
        let local = !u.contains("://") || u.starts_with("file://");
        let dir = u.strip_prefix("file://").unwrap_or(u);
        if local && !dir.is_empty() && !std::path::Path::new(dir).is_dir() {
            return Err(BackupError::Config(format!(
                "the backup directory {dir} does not exist"
            )));
        }
        Target::open(url)
    }

    /// The URL the target was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Local directory or S3.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// How many reads of single objects to keep in flight, for a caller that would keep
    /// `wanted` in flight against a bucket: a bucket's reads are asynchronous requests, a
    /// local directory's each take one of the runtime's blocking threads (see
    /// [`Target::get_many`]), so they are held to [`LOCAL_READS_IN_FLIGHT`].
    pub(crate) fn reads_in_flight(&self, wanted: usize) -> usize {
        match self.kind {
            TargetKind::Local => wanted.clamp(1, LOCAL_READS_IN_FLIGHT),
            TargetKind::S3 => wanted.max(1),
        }
    }

    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{key}", self.prefix))
    }

    fn err(&self, source: object_store::Error) -> BackupError {
        BackupError::Target {
            target: self.url.clone(),
            source,
        }
    }

    /// Writes object `key`, in `storage_class` when given (S3 only).
    pub async fn put(&self, key: &str, bytes: Vec<u8>, storage_class: Option<&str>) -> Result<()> {
        let mut opts = PutOptions::default();
        if let (Some(class), TargetKind::S3) = (storage_class, self.kind) {
            let mut attrs = Attributes::new();
            attrs.insert(
                Attribute::StorageClass,
                AttributeValue::from(class.to_owned()),
            );
            opts.attributes = attrs;
        }
        self.store
            .put_opts(&self.path(key), PutPayload::from(bytes), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Reads object `key`; `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => r.bytes().await.map(Some).map_err(|e| self.err(e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Reads the objects `keys` (each `None` when it does not exist), in no particular
    /// order. A bucket's are read 32 at a time. A local directory's are read one after
    /// another in one blocking task: each read of its own would take one of the runtime's
    /// blocking threads, a burst of them makes the runtime start more (it starts one whenever
    /// none is idle at that instant, even as another is finishing), and those threads then
    /// stay for as long as blocking work keeps arriving (the runtime wakes its idle threads
    /// in turn, so none is idle for the 10 s it takes to end), each with allocator pages of
    /// its own. Reading a catalog of a few hundred records 32 at a time took a node from 7
    /// to 49 threads for good and its memory from 89 MiB to about 300 MiB over the next ten
    /// minutes (BENCHMARKS.md, "Soak").
    pub async fn get_many(&self, keys: Vec<String>) -> Result<Vec<(String, Option<Bytes>)>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let Some(local) = self.local.clone() else {
            return futures::stream::iter(keys)
                .map(|k| async move { self.get(&k).await.map(|b| (k, b)) })
                .buffer_unordered(32)
                .try_collect()
                .await;
        };
        let paths: Vec<(String, ObjectPath)> = keys
            .into_iter()
            .map(|k| {
                let p = self.path(&k);
                (k, p)
            })
            .collect();
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .map(|(key, location)| {
                    let file = local.path_to_filesystem(&location).map_err(|source| {
                        BackupError::Target {
                            target: url.clone(),
                            source,
                        }
                    })?;
                    match std::fs::read(&file) {
                        Ok(bytes) => Ok((key, Some(Bytes::from(bytes)))),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((key, None)),
                        Err(e) => Err(BackupError::io(format!("reading {}", file.display()), e)),
                    }
                })
                .collect()
        })
        .await
        .map_err(|e| BackupError::Config(format!("reading task failed: {e}")))?
    }

    /// Every object whose key starts with `prefix` (a directory-like prefix ending in `/`).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let base = self.path(prefix.trim_end_matches('/'));
        let strip = self.prefix.len();
        let items: Vec<_> = match self.store.list(Some(&base)).try_collect().await {
            Ok(items) => items,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(self.err(e)),
        };
        let mut out: Vec<Listed> = items
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                let key = full.get(strip..)?.to_owned();
                Some(Listed {
                    key,
                    size: m.size,
                    modified_millis: m.last_modified.timestamp_millis().max(0) as u64,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes object `key`; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Moves object `key` to `storage_class` by rewriting it (S3). Returns `false` when the
    /// target has no storage classes (a local directory): nothing is changed then.
    pub async fn set_storage_class(&self, key: &str, storage_class: &str) -> Result<bool> {
        if self.kind != TargetKind::S3 {
            return Ok(false);
        }
        let Some(bytes) = self.get(key).await? else {
            return Err(BackupError::Damaged {
                object: key.to_owned(),
                reason: "missing".into(),
            });
        };
        self.put(key, bytes.to_vec(), Some(storage_class)).await?;
        Ok(true)
    }
}

fn normalize_prefix(p: &str) -> String {
    let p = p.trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}
