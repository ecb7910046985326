//! What a backup target holds, read from its manifest records: the deployment, its
//! generations, and in each generation the chain of snapshots and segments, with the points it
//! can restore.

use crate::error::{BackupError, Result};
use crate::manifest::{
    DEPLOYMENT_KEY, Deployment, GenerationInfo, ManifestEntry, ObjectKind, generation_key,
    parse_manifest_key,
};
use crate::target::Target;

/// A point to restore to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// The newest point the backup holds.
    Latest,
    /// Every change with sequence at most this.
    Seq(u64),
    /// Every change committed at or before this Unix millisecond.
    Time(u64),
}

/// One generation: an unbroken history of one data directory's change log.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generation id.
    pub id: String,
    /// Its record, if present.
    pub info: Option<GenerationInfo>,
    /// Snapshots, by sequence.
    pub snapshots: Vec<ManifestEntry>,
    /// Segments, by first sequence.
    pub segments: Vec<ManifestEntry>,
}

/// A break in a generation's chain of segments.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    /// Generation.
    pub generation: String,
    /// Last sequence present before the gap.
    pub after_seq: u64,
    /// First sequence present after it.
    pub resumes_at_seq: u64,
    /// Commit time of the last entry before the gap.
    pub after_millis: u64,
    /// Commit time of the first entry after it.
    pub resumes_at_millis: u64,
}

/// The continuous part of a generation: from its first snapshot through the segments that
/// follow it without a break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Restorable {
    /// Oldest restorable sequence (the first snapshot's).
    pub first_seq: u64,
    /// Its commit time.
    pub first_millis: u64,
    /// Newest restorable sequence.
    pub last_seq: u64,
    /// Its commit time.
    pub last_millis: u64,
}

/// The objects to read, in order, to restore one point.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Generation.
    pub generation: String,
    /// The snapshot to start from.
    pub snapshot: ManifestEntry,
    /// The segments to replay after it, in order.
    pub segments: Vec<ManifestEntry>,
    /// Replay stops after this sequence.
    pub until_seq: u64,
    /// Replay stops before the first entry committed after this millisecond, if set.
    pub until_millis: Option<u64>,
}

impl Generation {
    /// Every manifest entry of the generation.
    pub fn entries(&self) -> impl Iterator<Item = &ManifestEntry> {
        self.snapshots.iter().chain(self.segments.iter())
    }

    /// Greatest sequence any object of the generation covers.
    pub fn last_shipped_seq(&self) -> u64 {
        self.entries().map(|e| e.last_seq).max().unwrap_or(0)
    }

    /// Where shipping resumes: the end of the continuous chain of segments after the newest
    /// bridging snapshot (a snapshot that segments do not also cover).
    pub fn resume_seq(&self) -> u64 {
        let Some(base) = self
            .snapshots
            .iter()
            .filter(|s| s.bridge)
            .max_by_key(|s| s.last_seq)
            .or_else(|| self.snapshots.first())
        else {
            return 0;
        };
        let (chain, _) = self.chain_after(base);
        chain.last().map_or(base.last_seq, |s| s.last_seq)
    }

    /// The segments that continue snapshot `base` without a break, and the gap that ends
    /// them, if any segment lies beyond it.
    pub fn chain_after(&self, base: &ManifestEntry) -> (Vec<ManifestEntry>, Option<Gap>) {
        let mut out = Vec::new();
        // Manifest records come from the target: a range may end at the last sequence there
        // is, and then nothing can follow it.
        let Some(mut next) = base.last_seq.checked_add(1) else {
            return (out, None);
        };
        let mut last_millis = base.last_millis;
        for s in &self.segments {
            if s.last_seq < next {
                continue;
            }
            if s.first_seq <= next {
                // Starts at the next sequence, or straddles a snapshot taken in its range
                // (its entries up to the snapshot are skipped when replaying).
                last_millis = s.last_millis;
                out.push(s.clone());
                match s.last_seq.checked_add(1) {
                    Some(n) => next = n,
                    None => return (out, None),
                }
                continue;
            }
            // A later snapshot may bridge the gap; the caller decides.
            let gap = Gap {
                generation: self.id.clone(),
                after_seq: next - 1,
                resumes_at_seq: s.first_seq,
                after_millis: last_millis,
                resumes_at_millis: s.first_millis,
            };
            return (out, Some(gap));
        }
        (out, None)
    }

    /// The gaps of the generation: breaks in its segment chain that no snapshot bridges.
    pub fn gaps(&self) -> Vec<Gap> {
        let mut gaps = Vec::new();
        let Some(first) = self.snapshots.first() else {
            return gaps;
        };
        let mut base = first.clone();
        loop {
            let (chain, gap) = self.chain_after(&base);
            let reached = chain.last().map_or(base.last_seq, |s| s.last_seq);
            // Continue from the newest snapshot at or beyond what the chain reached.
            let bridge = self
                .snapshots
                .iter()
                .filter(|s| s.last_seq >= reached && s.last_seq > base.last_seq)
                .min_by_key(|s| s.last_seq);
            match (gap, bridge) {
                (None, _) => return gaps,
                (Some(g), Some(b)) if b.last_seq.saturating_add(1) >= g.resumes_at_seq => {
                    base = b.clone()
                }
                (Some(g), b) => {
                    let resumes = g.resumes_at_seq;
                    gaps.push(g);
                    // Resume at the next snapshot, if any, after the gap.
                    match b.or_else(|| self.snapshots.iter().find(|s| s.last_seq >= resumes)) {
                        Some(b) if b.last_seq > base.last_seq => base = b.clone(),
                        _ => return gaps,
                    }
                }
            }
        }
    }

    /// The restorable range: from the first snapshot to the end of the continuous chain
    /// after the newest snapshot that can be reached.
    pub fn restorable(&self) -> Option<Restorable> {
        let first = self.snapshots.first()?;
        let mut last_seq = first.last_seq;
        let mut last_millis = first.last_millis;
        for snap in &self.snapshots {
            let (chain, _) = self.chain_after(snap);
            let (s, m) = chain.last().map_or((snap.last_seq, snap.last_millis), |c| {
                (c.last_seq, c.last_millis)
            });
            if s > last_seq {
                last_seq = s;
                last_millis = m;
            }
        }
        Some(Restorable {
            first_seq: first.last_seq,
            first_millis: first.last_millis,
            last_seq,
            last_millis,
        })
    }

    /// The newest snapshot that `fits`.
    fn newest_snapshot(&self, fits: impl Fn(&ManifestEntry) -> bool) -> Option<&ManifestEntry> {
        self.snapshots
            .iter()
            .filter(|s| fits(s))
            .max_by_key(|s| s.last_seq)
    }

    /// Plans a restore of `point` from this generation: the newest snapshot at or before it,
    /// then the segments after that snapshot up to the point. Snapshots in `skip` (known
    /// damaged) are not used.
    pub fn plan(&self, point: Point, skip: &[String]) -> Result<Plan> {
        let usable = |s: &&ManifestEntry| !skip.contains(&s.object);
        let snapshot = match point {
            Point::Latest => {
                // The snapshot whose chain reaches furthest (ties: the newest).
                self.snapshots.iter().filter(usable).max_by_key(|s| {
                    let (chain, _) = self.chain_after(s);
                    (chain.last().map_or(s.last_seq, |c| c.last_seq), s.last_seq)
                })
            }
            // The newest usable snapshot at or before the point.
            Point::Seq(n) => self.newest_snapshot(|s| usable(&s) && s.last_seq <= n),
            Point::Time(t) => self.newest_snapshot(|s| usable(&s) && s.last_millis <= t),
        };
        let Some(snapshot) = snapshot.cloned() else {
            let earliest = self.restorable();
            return Err(BackupError::NothingToRestore(match (point, earliest) {
                (_, None) => format!("generation {} holds no usable snapshot", self.id),
                (Point::Seq(n), Some(r)) => format!(
                    "sequence {n} is before the oldest restorable point of generation {} (sequence {})",
                    self.id, r.first_seq
                ),
                (_, Some(r)) => format!(
                    "that time is before the oldest restorable point of generation {} ({})",
                    self.id,
                    crate::fmt_millis(r.first_millis)
                ),
            }));
        };
        let (chain, _) = self.chain_after(&snapshot);
        let (until_seq, until_millis) = match point {
            Point::Latest => (u64::MAX, None),
            Point::Seq(n) => (n, None),
            Point::Time(t) => (u64::MAX, Some(t)),
        };
        let segments = chain
            .into_iter()
            .take_while(|s| {
                s.first_seq <= until_seq && until_millis.is_none_or(|t| s.first_millis <= t)
            })
            .collect();
        Ok(Plan {
            generation: self.id.clone(),
            snapshot,
            segments,
            until_seq,
            until_millis,
        })
    }
}

/// Everything a target holds.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// The deployment record, if the target has been used.
    pub deployment: Option<Deployment>,
    /// Generations, oldest first.
    pub generations: Vec<Generation>,
    /// Keys of objects under `generations/` that no manifest entry or generation record
    /// names (left by an interrupted upload or prune), with their modification times.
    pub unreferenced: Vec<(String, u64)>,
    /// Manifest records that could not be read.
    pub bad_manifests: Vec<(String, String)>,
}

/// Manifest records already read, so that a long-running shipper lists the target but reads
/// only the records that are new or changed since the last time.
#[derive(Clone, Debug, Default)]
pub struct ManifestCache {
    /// Manifest key -> (modification time when read, content).
    records: std::collections::HashMap<String, (u64, bytes::Bytes)>,
    /// Generation records, which never change.
    generations: std::collections::HashMap<String, GenerationInfo>,
}

/// What a target's `generations/` folder lists: every manifest record (read from the
/// target, or from the cache when unchanged), the generations named, and the other objects.
struct Listing {
    manifests: Vec<(String, Option<bytes::Bytes>)>,
    generation_ids: std::collections::BTreeSet<String>,
    objects: Vec<(String, u64)>,
}

impl Listing {
    async fn read(target: &Target, cache: &mut ManifestCache) -> Result<Listing> {
        let listed = target.list("generations/").await?;
        let mut manifest_keys = Vec::new();
        let mut cached = Vec::new();
        let mut generation_ids = std::collections::BTreeSet::new();
        let mut objects = Vec::new();
        for item in &listed {
            if let Some((g, ..)) = parse_manifest_key(&item.key) {
                generation_ids.insert(g);
                match cache.records.get(&item.key) {
                    Some((modified, bytes)) if *modified == item.modified_millis => {
                        cached.push((item.key.clone(), Some(bytes.clone())));
                    }
                    _ => manifest_keys.push((item.key.clone(), item.modified_millis)),
                }
            } else if let Some(rest) = item.key.strip_prefix("generations/")
                && let Some((g, name)) = rest.split_once('/')
            {
                generation_ids.insert(g.to_owned());
                if name != "generation.json" {
                    objects.push((item.key.clone(), item.modified_millis));
                }
            }
        }
        let modified: std::collections::HashMap<String, u64> = manifest_keys.into_iter().collect();
        let mut manifests: Vec<(String, Option<bytes::Bytes>)> = target
            .get_many(modified.keys().cloned().collect())
            .await?
            .into_iter()
            .map(|(k, b)| {
                if let Some(b) = &b
                    && let Some(modified) = modified.get(k.as_str())
                {
                    cache.records.insert(k.clone(), (*modified, b.clone()));
                }
                (k, b)
            })
            .collect();
        // Forget records that are gone from the target.
        let listed: std::collections::HashSet<&str> =
            listed.iter().map(|l| l.key.as_str()).collect();
        cache.records.retain(|k, _| listed.contains(k.as_str()));
        manifests.append(&mut cached);
        Ok(Listing {
            manifests,
            generation_ids,
            objects,
        })
    }
}

/// The objects of `objects` that no manifest record names (leftovers of interrupted uploads).
fn unreferenced(
    by_gen: &std::collections::BTreeMap<String, Generation>,
    bad_manifests: &[(String, String)],
    objects: Vec<(String, u64)>,
) -> Vec<(String, u64)> {
    let mut referenced: std::collections::HashSet<String> = by_gen
        .values()
        .flat_map(|g| g.entries().map(|e| e.object.clone()))
        .collect();
    // An unreadable manifest record still names its object: never treat that object as
    // a leftover (retention would delete it).
    for (key, _) in bad_manifests {
        if let Some((g, kind, first, last)) = parse_manifest_key(key) {
            referenced.insert(match kind {
                ObjectKind::Segment => crate::manifest::segment_key(&g, first, last),
                ObjectKind::Snapshot => crate::manifest::snapshot_key(&g, last),
            });
        }
    }
    objects
        .into_iter()
        .filter(|(k, _)| !referenced.contains(k.as_str()))
        .collect()
}

impl Catalog {
    /// Reads the catalog of `target`.
    pub async fn load(target: &Target) -> Result<Catalog> {
        Catalog::load_cached(target, &mut ManifestCache::default()).await
    }

    /// Reads the catalog of `target`, reusing and refreshing `cache`.
    pub async fn load_cached(target: &Target, cache: &mut ManifestCache) -> Result<Catalog> {
        let deployment = match target.get(DEPLOYMENT_KEY).await? {
            None => None,
            Some(b) => Some(serde_json::from_slice::<Deployment>(&b).map_err(|e| {
                BackupError::Damaged {
                    object: DEPLOYMENT_KEY.into(),
                    reason: format!("cannot parse: {e}"),
                }
            })?),
        };
        let Listing {
            manifests: fetched,
            generation_ids,
            objects,
        } = Listing::read(target, cache).await?;
        let mut catalog = Catalog {
            deployment,
            ..Catalog::default()
        };
        let mut by_gen: std::collections::BTreeMap<String, Generation> = generation_ids
            .into_iter()
            .map(|id| {
                (
                    id.clone(),
                    Generation {
                        id,
                        info: None,
                        snapshots: Vec::new(),
                        segments: Vec::new(),
                    },
                )
            })
            .collect();
        for (key, bytes) in fetched {
            let Some(bytes) = bytes else { continue };
            match serde_json::from_slice::<ManifestEntry>(&bytes) {
                Ok(e) if e.manifest_key() == key => {
                    let g = by_gen.get_mut(&e.generation).expect("listed generation");
                    match e.kind {
                        ObjectKind::Snapshot => g.snapshots.push(e),
                        ObjectKind::Segment => g.segments.push(e),
                    }
                }
                Ok(_) => catalog
                    .bad_manifests
                    .push((key, "its content names another object".into())),
                Err(e) => catalog
                    .bad_manifests
                    .push((key, format!("cannot parse: {e}"))),
            }
        }
        for g in by_gen.values_mut() {
            if let Some(info) = cache.generations.get(&g.id) {
                g.info = Some(info.clone());
            } else if let Some(b) = target.get(&generation_key(&g.id)).await? {
                g.info = serde_json::from_slice(&b).ok();
                if let Some(info) = &g.info {
                    cache.generations.insert(g.id.clone(), info.clone());
                }
            }
            g.snapshots.sort_by_key(|e| e.last_seq);
            g.segments.sort_by_key(|e| (e.first_seq, e.last_seq));
        }
        catalog.unreferenced = unreferenced(&by_gen, &catalog.bad_manifests, objects);
        catalog.generations = by_gen.into_values().collect();
        Ok(catalog)
    }

    /// Generation `id`.
    pub fn generation(&self, id: &str) -> Option<&Generation> {
        self.generations.iter().find(|g| g.id == id)
    }

    /// The generation holding the newest restorable point (ties: the newer generation). A
    /// restore drill that ships a short generation of its own does not hide a production
    /// generation that keeps shipping.
    pub fn latest(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .filter_map(|g| g.restorable().map(|r| (r.last_millis, r.last_seq, g)))
            .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, g)| g)
    }

    /// The generation to restore `point` from. For a time: among the generations whose
    /// restorable range contains it, the one that started earliest (the original history: a
    /// generation started from a restore holds the restored state, not the writes the
    /// original made after that point); when none contains it, the one with the newest point
    /// at or before it. Otherwise: [`Catalog::latest`].
    pub fn generation_for(&self, point: Point) -> Option<&Generation> {
        match point {
            Point::Time(t) => {
                let ranged: Vec<(Restorable, &Generation)> = self
                    .generations
                    .iter()
                    .filter_map(|g| g.restorable().map(|r| (r, g)))
                    .filter(|(r, _)| r.first_millis <= t)
                    .collect();
                ranged
                    .iter()
                    .filter(|(r, _)| t <= r.last_millis)
                    .min_by_key(|(r, _)| r.first_millis)
                    .or_else(|| {
                        ranged
                            .iter()
                            .max_by_key(|(r, _)| (r.last_millis, r.last_seq))
                    })
                    .map(|(_, g)| *g)
            }
            _ => self.latest(),
        }
    }
}
