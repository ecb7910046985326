//! Backup objects and manifests, as read back from a target nobody vouches for: key files,
//! sealed objects (header, AES-GCM, zstd), an object's plaintext checked against its manifest
//! entry, manifest keys and records, and a catalog (generations, chains, gaps, restore plans,
//! retention) read from an arbitrary set of manifest records. Bad input is an error, never a
//! panic.
//!
//! The first byte picks the part; the rest is its input.
#![no_main]

use haven_backup::catalog::{Catalog, Point};
use haven_backup::crypto::{self, BackupKey};
use haven_backup::format;
use haven_backup::manifest::{
    self, Deployment, GenerationInfo, ManifestEntry, ObjectKind, parse_manifest_key,
};
use haven_backup::{BackupError, RetentionPolicy, retention};
use haven_fuzz::{assert_clear_message, runtime};
use haven_state::LogEntry;
use libfuzzer_sys::fuzz_target;

const DEPLOYMENT: &str = "dep-fuzz";
const OBJECT: &str = "generations/g1/segments/x.hseg";
/// Decompressed-size bound given to `open` here (the real bound is 4 GiB).
const MAX_PLAIN: usize = 1 << 20;

fn key() -> BackupKey {
    BackupKey::from_bytes([7; 32])
}

/// Reads small numbers from the input: most are one byte, a marker byte asks for eight.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn num(&mut self) -> u64 {
        match self.byte() {
            0xFF => {
                let mut b = [0u8; 8];
                for x in &mut b {
                    *x = self.byte();
                }
                u64::from_le_bytes(b)
            }
            0xFE => u64::MAX - u64::from(self.byte()),
            n => u64::from(n),
        }
    }
}

fn damaged_or_other(e: &BackupError) {
    assert_clear_message("backup error", &e.to_string());
}

/// `open` on arbitrary bytes: refused (nobody can forge the tag without the key).
fn open_raw(data: &[u8]) {
    let _ = crypto::sealed_deployment(data);
    match crypto::open(&key(), DEPLOYMENT, OBJECT, data, MAX_PLAIN) {
        Ok(_) => panic!("arbitrary bytes opened as a sealed object"),
        Err(e) => damaged_or_other(&e),
    }
}

/// Arbitrary bytes as the compressed content of a genuinely sealed object: the zstd stage
/// decodes them or refuses them; what decodes goes on to the object decoder.
fn open_compressed(data: &[u8]) {
    let sealed =
        haven_backup::fuzzing::seal_compressed(&key(), DEPLOYMENT, OBJECT, data).expect("sealing");
    match crypto::open(&key(), DEPLOYMENT, OBJECT, &sealed, MAX_PLAIN) {
        Ok(plain) => decode_plain(&plain),
        Err(e) => damaged_or_other(&e),
    }
    // Altered in any byte, or read as another object or deployment: refused.
    let mut altered = sealed.clone();
    let i = data.len() % altered.len();
    altered[i] ^= 0x01;
    assert!(crypto::open(&key(), DEPLOYMENT, OBJECT, &altered, MAX_PLAIN).is_err());
    assert!(crypto::open(&key(), DEPLOYMENT, "other", &sealed, MAX_PLAIN).is_err());
}

/// `seal` then `open` gives the plaintext back.
fn seal_round_trip(data: &[u8]) {
    let sealed = crypto::seal(&key(), DEPLOYMENT, OBJECT, data).expect("sealing");
    assert_eq!(crypto::sealed_deployment(&sealed), Some(DEPLOYMENT));
    let plain = crypto::open(&key(), DEPLOYMENT, OBJECT, &sealed, data.len().max(1))
        .expect("a sealed object opens");
    assert_eq!(plain, data);
}

/// An object's plaintext against a manifest entry that agrees with its header (so that the
/// checks of its entries are reached), and against one that does not.
fn decode_plain(plain: &[u8]) {
    let header = postcard::take_from_bytes::<(u32, ObjectKind, u64, u64)>(plain).ok();
    let items = header
        .as_ref()
        .and_then(|(_, rest)| postcard::take_from_bytes::<Vec<LogEntry>>(rest).ok())
        .map_or(0, |(v, _)| v.len() as u64);
    let (kind, first, last) =
        header.map_or((ObjectKind::Segment, 1, 1), |((_, k, f, l), _)| (k, f, l));
    let entry = manifest_entry("g1", kind, first, last, items);
    if let Err(e) = format::decode(&entry, plain) {
        damaged_or_other(&e);
    }
}

fn manifest_entry(
    generation: &str,
    kind: ObjectKind,
    first: u64,
    last: u64,
    items: u64,
) -> ManifestEntry {
    let object = match kind {
        ObjectKind::Segment => manifest::segment_key(generation, first, last),
        ObjectKind::Snapshot => manifest::snapshot_key(generation, last),
    };
    ManifestEntry {
        kind,
        generation: generation.to_owned(),
        object,
        first_seq: first,
        last_seq: last,
        first_millis: 0,
        last_millis: 0,
        items,
        size: 0,
        sha256: String::new(),
        created_millis: 0,
        storage_class: None,
        bridge: false,
    }
}

/// Entries decoded from the input, encoded as an object of the range the input names: the
/// decoder accepts exactly the objects whose sequences fit the range.
fn encode_decode(data: &[u8]) {
    let mut r = Reader(data);
    let kind = if r.byte() % 2 == 0 {
        ObjectKind::Segment
    } else {
        ObjectKind::Snapshot
    };
    let first = r.num();
    let last = r.num();
    let mut entries = Vec::new();
    let mut rest = r.0;
    while entries.len() < 32 {
        let seq = Reader(rest).num();
        let skip = match rest.first() {
            Some(0xFF) => 9,
            Some(0xFE) => 2,
            Some(_) => 1,
            None => break,
        };
        rest = &rest[skip.min(rest.len())..];
        let Ok((change, tail)) = postcard::take_from_bytes(rest) else {
            break;
        };
        rest = tail;
        entries.push(LogEntry { seq, change });
    }
    let plain = format::encode(kind, first, last, &entries);
    let entry = manifest_entry("g1", kind, first, last, entries.len() as u64);
    match format::decode(&entry, &plain) {
        Ok(back) => assert_eq!(back, entries),
        Err(e) => damaged_or_other(&e),
    }
}

fn manifest_key_round_trip(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some((g, kind, first, last)) = parse_manifest_key(&text) {
        let again = manifest::manifest_key(&g, kind, first, last);
        assert_eq!(parse_manifest_key(&again), Some((g, kind, first, last)));
    }
}

fn records(data: &[u8]) {
    if let Ok(e) = serde_json::from_slice::<ManifestEntry>(data) {
        let _ = parse_manifest_key(&e.manifest_key());
        let back: ManifestEntry =
            serde_json::from_slice(&serde_json::to_vec(&e).expect("serializes")).expect("parses");
        assert_eq!(back, e);
    }
    let _ = serde_json::from_slice::<Deployment>(data);
    let _ = serde_json::from_slice::<GenerationInfo>(data);
    let _ = BackupKey::parse(data).map(|k| k.fingerprint());
}

/// The manifest records, generation records and stray objects the input describes (at most
/// 24), as (key, content).
fn target_records(r: &mut Reader) -> Vec<(String, Vec<u8>)> {
    let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
    for _ in 0..24 {
        if r.0.is_empty() {
            break;
        }
        let op = r.byte();
        let generation = ["g1", "g2", "0190aa-x"][usize::from(op >> 4) % 3];
        match op % 8 {
            0..=4 => {
                let kind = if op.is_multiple_of(2) {
                    ObjectKind::Segment
                } else {
                    ObjectKind::Snapshot
                };
                let first = r.num();
                let last = r.num();
                let items = r.num();
                let mut e = manifest_entry(generation, kind, first, last, items);
                e.first_millis = r.num();
                e.last_millis = r.num();
                e.bridge = r.byte() % 2 == 1;
                let key = if op % 8 == 4 {
                    // A record under another key than its content names.
                    manifest::manifest_key(generation, kind, first ^ 1, last)
                } else {
                    e.manifest_key()
                };
                puts.push((key, serde_json::to_vec(&e).expect("serializes")));
            }
            5 => {
                // A record whose content is arbitrary bytes.
                let n = usize::from(r.byte()).min(r.0.len());
                let (content, rest) = r.0.split_at(n);
                r.0 = rest;
                let key = manifest::manifest_key(generation, ObjectKind::Segment, r.num(), r.num());
                puts.push((key, content.to_vec()));
            }
            6 => {
                // An object or record under an arbitrary key.
                let n = usize::from(r.byte()).min(r.0.len());
                let (name, rest) = r.0.split_at(n);
                r.0 = rest;
                let name = String::from_utf8_lossy(name);
                puts.push((format!("generations/{generation}/{name}"), b"{}".to_vec()));
            }
            _ => {
                let info = GenerationInfo {
                    id: generation.to_owned(),
                    created_millis: r.num(),
                    origin: "fuzz/node-1".into(),
                    start_seq: r.num(),
                };
                puts.push((
                    manifest::generation_key(generation),
                    serde_json::to_vec(&info).expect("serializes"),
                ));
            }
        }
    }
    puts
}

/// A target holding the manifest records (and stray objects) the input describes, read as
/// a catalog; then every question the shipper, `backup list`, restore and retention ask it.
fn catalog(data: &[u8]) {
    let mut r = Reader(data);
    let target = haven_backup::fuzzing::memory_target();
    let rt = runtime();
    let puts = target_records(&mut r);
    let catalog = rt.block_on(async {
        for (k, v) in puts {
            target.put(&k, v, None).await.expect("in-memory put");
        }
        Catalog::load(&target).await
    });
    let catalog = match catalog {
        Ok(c) => c,
        Err(e) => return damaged_or_other(&e),
    };
    let at = r.num();
    for g in &catalog.generations {
        let _ = g.last_shipped_seq();
        let _ = g.resume_seq();
        let _ = g.gaps();
        let _ = g.restorable();
        for s in &g.snapshots {
            let _ = g.chain_after(s);
        }
        for point in [Point::Latest, Point::Seq(at), Point::Time(at)] {
            match g.plan(point, &[]) {
                Ok(plan) => {
                    let mut next = plan.snapshot.last_seq;
                    for s in &plan.segments {
                        assert!(
                            s.first_seq <= next.saturating_add(1),
                            "a plan skips a range"
                        );
                        next = next.max(s.last_seq);
                    }
                }
                Err(e) => damaged_or_other(&e),
            }
        }
    }
    let _ = catalog.latest();
    let _ = catalog.generation_for(Point::Time(at));
    let _ = retention::plan(&catalog, at, &RetentionPolicy::default());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 8 {
        0 => open_raw(rest),
        1 => open_compressed(rest),
        2 => seal_round_trip(rest),
        3 => decode_plain(rest),
        4 => encode_decode(rest),
        5 => manifest_key_round_trip(rest),
        6 => records(rest),
        _ => catalog(rest),
    }
});
