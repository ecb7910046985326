//! What a backup target holds, described by small plaintext JSON records next to the encrypted
//! objects: the deployment the backup belongs to, and one manifest entry per segment or
//! snapshot (its sequence and time range, size and SHA-256). An object counts as part of the
//! backup only once its manifest entry exists; the entry is written after the object.

use serde::{Deserialize, Serialize};

/// Format version of the objects and manifest entries this code writes.
pub const FORMAT: u32 = 1;

impl ManifestEntry {
    /// Key of this entry's manifest record.
    pub fn manifest_key(&self) -> String {
        manifest_key(&self.generation, self.kind, self.first_seq, self.last_seq)
    }
}

/// The record at `deployment.json`: which deployment the backup belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Deployment id (also stored in the deployment's own state).
    pub id: String,
    /// Object format version.
    pub format: u32,
    /// Fingerprint of the encryption key, to refuse a wrong key with a clear message.
    pub key_fingerprint: String,
    /// When the first backup was made, Unix milliseconds.
    pub created_millis: u64,
}

/// What a backup object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// The full state (every record, tombstones included, and every stream event) as of
    /// `last_seq`. `first_seq` is 0.
    Snapshot,
    /// The change-log entries `first_seq..=last_seq`, in order.
    Segment,
}

/// One manifest entry: a backup object and what it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Kind of object.
    pub kind: ObjectKind,
    /// Generation the object belongs to.
    pub generation: String,
    /// Object key, relative to the target's prefix.
    pub object: String,
    /// First change-log sequence covered (for a snapshot: 0).
    pub first_seq: u64,
    /// Last change-log sequence covered.
    pub last_seq: u64,
    /// Commit time (HLC wall-clock part, Unix milliseconds) of the first entry covered
    /// (for a snapshot: of its oldest entry); 0 when it holds none.
    pub first_millis: u64,
    /// Commit time of the last entry covered (for a snapshot: of the state's newest entry).
    pub last_millis: u64,
    /// Number of log entries (segment) or records plus events (snapshot) in the object.
    pub items: u64,
    /// Size of the stored (compressed, encrypted) object in bytes.
    pub size: u64,
    /// SHA-256 of the stored object, hex.
    pub sha256: String,
    /// When the object was written, Unix milliseconds.
    pub created_millis: u64,
    /// Storage class the object was last written or moved to (`None`: the target's default).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// For a snapshot: the chain of segments continues after it (it starts a generation or
    /// bridges a hole in the local log), rather than segments also covering its range.
    #[serde(default)]
    pub bridge: bool,
}

/// The record at `generations/<id>/generation.json`: one unbroken history of the change log.
/// A data directory starts a new generation the first time it ships (a fresh node, or a node
/// restored from backup, whose log continues from an earlier point).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// Generation id: creation time (hex milliseconds) and a random suffix, so ids sort by age.
    pub id: String,
    /// When it was started, Unix milliseconds.
    pub created_millis: u64,
    /// The node that ships it (`region/node`).
    pub origin: String,
    /// Change-log sequence the data directory was at when the generation started.
    pub start_seq: u64,
}

/// Prefix of every key of generation `id`.
pub fn generation_prefix(id: &str) -> String {
    format!("generations/{id}/")
}

/// Key of generation `id`'s record.
pub fn generation_key(id: &str) -> String {
    format!("generations/{id}/generation.json")
}

/// Key of the manifest record of an object of generation `generation` covering `first..=last`.
/// Sorting the keys of a generation sorts its entries by kind, then by range.
pub fn manifest_key(generation: &str, kind: ObjectKind, first: u64, last: u64) -> String {
    let k = match kind {
        ObjectKind::Snapshot => "snapshot",
        ObjectKind::Segment => "segment",
    };
    format!("generations/{generation}/manifest/{k}-{first:020}-{last:020}.json")
}

/// Parses a manifest key back into (generation, kind, first, last).
pub fn parse_manifest_key(key: &str) -> Option<(String, ObjectKind, u64, u64)> {
    let rest = key.strip_prefix("generations/")?;
    let (generation, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix("manifest/")?.strip_suffix(".json")?;
    let (kind, range) = if let Some(r) = name.strip_prefix("snapshot-") {
        (ObjectKind::Snapshot, r)
    } else {
        (ObjectKind::Segment, name.strip_prefix("segment-")?)
    };
    let (a, b) = range.split_once('-')?;
    Some((
        generation.to_owned(),
        kind,
        a.parse().ok()?,
        b.parse().ok()?,
    ))
}

/// Object key of a segment of `generation` covering `first..=last`.
pub fn segment_key(generation: &str, first: u64, last: u64) -> String {
    format!("generations/{generation}/segments/{first:020}-{last:020}.hseg")
}

/// Object key of a snapshot of `generation` as of `seq`.
pub fn snapshot_key(generation: &str, seq: u64) -> String {
    format!("generations/{generation}/snapshots/{seq:020}.hsnap")
}

/// Key of the deployment record.
pub const DEPLOYMENT_KEY: &str = "deployment.json";
/// Key of the latest verification report.
pub const VERIFICATION_KEY: &str = "verification/latest.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_keys_round_trip_and_sort_by_range() {
        let k = manifest_key("g1", ObjectKind::Segment, 11, 20);
        assert_eq!(
            parse_manifest_key(&k),
            Some(("g1".into(), ObjectKind::Segment, 11, 20))
        );
        let s = manifest_key("g1", ObjectKind::Snapshot, 0, 7);
        assert_eq!(
            parse_manifest_key(&s),
            Some(("g1".into(), ObjectKind::Snapshot, 0, 7))
        );
        assert!(
            manifest_key("g", ObjectKind::Segment, 9, 10)
                < manifest_key("g", ObjectKind::Segment, 11, 12)
        );
        assert_eq!(
            parse_manifest_key("generations/g/manifest/other.json"),
            None
        );
    }
}
