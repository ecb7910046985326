//! Verification: every object checked against its manifest entry (present, full size, same
//! SHA-256, decrypts under the key, decodes to exactly the range it claims) and every
//! generation's chain checked for continuity.

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Gap};
use crate::crypto::{self, BackupKey};
use crate::error::{BackupError, Result};
use crate::format;
use crate::manifest::{ManifestEntry, VERIFICATION_KEY};
use crate::target::Target;

/// What is wrong with one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Problem {
    /// The manifest names an object that does not exist.
    Missing {
        /// Object key.
        object: String,
    },
    /// The object is shorter than the manifest says.
    Truncated {
        /// Object key.
        object: String,
        /// Size in the manifest.
        expected: u64,
        /// Size found.
        found: u64,
    },
    /// The object's content differs from what was written (SHA-256, size or authentication).
    Altered {
        /// Object key.
        object: String,
        /// Details.
        detail: String,
    },
    /// A manifest record cannot be read.
    BadManifest {
        /// Manifest key.
        object: String,
        /// Details.
        detail: String,
    },
}

impl Problem {
    /// The object the problem is about.
    pub fn object(&self) -> &str {
        match self {
            Problem::Missing { object }
            | Problem::Truncated { object, .. }
            | Problem::Altered { object, .. }
            | Problem::BadManifest { object, .. } => object,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Missing { object } => write!(f, "missing: {object}"),
            Problem::Truncated {
                object,
                expected,
                found,
            } => write!(f, "truncated: {object} ({found} of {expected} bytes)"),
            Problem::Altered { object, detail } => write!(f, "altered: {object} ({detail})"),
            Problem::BadManifest { object, detail } => {
                write!(f, "unreadable manifest record: {object} ({detail})")
            }
        }
    }
}

/// The result of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// When it finished, Unix milliseconds.
    pub checked_at_millis: u64,
    /// Whether every object is intact and every chain continuous.
    pub ok: bool,
    /// Objects checked.
    pub objects: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Damaged objects.
    pub problems: Vec<Problem>,
    /// Breaks in a chain (after removing damaged objects) that no snapshot bridges.
    pub gaps: Vec<GapReport>,
    /// Objects no manifest names (normally left by an interrupted upload; pruned later).
    pub unreferenced: u64,
}

/// A chain break, serializable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapReport {
    /// Generation.
    pub generation: String,
    /// Last sequence present before the break.
    pub after_seq: u64,
    /// First sequence present after it.
    pub resumes_at_seq: u64,
    /// Commit time of the last entry before the break.
    pub after_millis: u64,
    /// Commit time of the first entry after it.
    pub resumes_at_millis: u64,
}

impl From<Gap> for GapReport {
    fn from(g: Gap) -> Self {
        GapReport {
            generation: g.generation,
            after_seq: g.after_seq,
            resumes_at_seq: g.resumes_at_seq,
            after_millis: g.after_millis,
            resumes_at_millis: g.resumes_at_millis,
        }
    }
}

/// Fetches one object and checks it against its entry; returns its entries when intact.
pub async fn fetch_checked(
    target: &Target,
    key: &BackupKey,
    deployment: &str,
    entry: &ManifestEntry,
) -> std::result::Result<Vec<haven_state::LogEntry>, Problem> {
    let object = entry.object.clone();
    let bytes = match target.get(&entry.object).await {
        Ok(Some(b)) => b,
        Ok(None) => return Err(Problem::Missing { object }),
        Err(e) => {
            return Err(Problem::Altered {
                object,
                detail: format!("cannot be read: {e}"),
            });
        }
    };
    let found = bytes.len() as u64;
    if found < entry.size {
        return Err(Problem::Truncated {
            object,
            expected: entry.size,
            found,
        });
    }
    if found != entry.size {
        return Err(Problem::Altered {
            object,
            detail: format!("{found} bytes, the manifest says {}", entry.size),
        });
    }
    if crypto::sha256_hex(&bytes) != entry.sha256 {
        return Err(Problem::Altered {
            object,
            detail: "SHA-256 differs from the manifest".into(),
        });
    }
    let plain = crypto::open(
        key,
        deployment,
        &entry.object,
        &bytes,
        format::MAX_PLAIN_BYTES,
    )
    .map_err(|e| Problem::Altered {
        object: object.clone(),
        detail: e.to_string(),
    })?;
    format::decode(entry, &plain).map_err(|e| Problem::Altered {
        object,
        detail: e.to_string(),
    })
}

/// Checks that `key` is the key the backup was written with and returns the deployment id.
pub fn check_key(target: &Target, catalog: &Catalog, key: &BackupKey) -> Result<String> {
    let Some(d) = &catalog.deployment else {
        return Err(BackupError::NothingToRestore(format!(
            "{} holds no Haven backup (no deployment.json)",
            target.url()
        )));
    };
    if d.key_fingerprint != key.fingerprint() {
        return Err(BackupError::WrongKey {
            target: target.url().to_owned(),
            expected: d.key_fingerprint.clone(),
            found: key.fingerprint(),
        });
    }
    Ok(d.id.clone())
}

/// Verifies the whole target. `progress` is called with (objects done, objects total).
pub async fn verify(
    target: &Target,
    key: &BackupKey,
    now_millis: u64,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<VerifyReport> {
    let catalog = Catalog::load(target).await?;
    let deployment = check_key(target, &catalog, key)?;
    let entries: Vec<ManifestEntry> = catalog
        .generations
        .iter()
        .flat_map(|g| g.entries().cloned())
        .collect();
    let total = entries.len() as u64;
    let mut report = VerifyReport {
        unreferenced: catalog.unreferenced.len() as u64,
        ..VerifyReport::default()
    };
    for (k, why) in &catalog.bad_manifests {
        report.problems.push(Problem::BadManifest {
            object: k.clone(),
            detail: why.clone(),
        });
    }
    let mut results = futures::stream::iter(entries)
        .map(|e| {
            let (target, key, deployment) = (target.clone(), key.clone(), deployment.clone());
            async move {
                let r = fetch_checked(&target, &key, &deployment, &e).await;
                (e, r)
            }
        })
        .buffered(target.reads_in_flight(8));
    let mut done = 0;
    let mut damaged = std::collections::HashSet::new();
    while let Some((e, r)) = results.next().await {
        done += 1;
        report.objects += 1;
        report.bytes += e.size;
        if let Err(p) = r {
            damaged.insert(e.object.clone());
            report.problems.push(p);
        }
        progress(done, total);
    }
    for g in &catalog.generations {
        let mut intact = g.clone();
        intact.snapshots.retain(|e| !damaged.contains(&e.object));
        intact.segments.retain(|e| !damaged.contains(&e.object));
        report
            .gaps
            .extend(intact.gaps().into_iter().map(GapReport::from));
        if intact.snapshots.is_empty() && !g.snapshots.is_empty() {
            report.gaps.push(GapReport {
                generation: g.id.clone(),
                after_seq: 0,
                resumes_at_seq: g.last_shipped_seq(),
                after_millis: 0,
                resumes_at_millis: 0,
            });
        }
    }
    report.ok = report.problems.is_empty() && report.gaps.is_empty();
    report.checked_at_millis = now_millis;
    Ok(report)
}

/// Stores `report` as the target's latest verification.
pub async fn save(target: &Target, report: &VerifyReport) -> Result<()> {
    let json = serde_json::to_vec_pretty(report).expect("serializable");
    target.put(VERIFICATION_KEY, json, None).await
}

/// The target's latest verification, if any.
pub async fn load_latest(target: &Target) -> Result<Option<VerifyReport>> {
    Ok(target
        .get(VERIFICATION_KEY)
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}
