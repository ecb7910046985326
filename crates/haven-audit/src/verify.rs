//! Verification of the whole log as the store holds it.
//!
//! For every chain, in sequence order: each record must be readable, sit under the key of its
//! own chain and sequence (else it was moved: reordered), follow the previous one without a gap
//! (else records were removed, unless an `audit.prune` record explains the chain's start) and
//! carry the hash of the previous record's bytes (else that record was altered). Every
//! checkpoint's signature must verify under a trusted key, and the record it vouches for must
//! still hash to what it signed (else records up to it were rewritten). The chain's head must
//! agree with its last record (else its tail was removed or altered).
//!
//! What it cannot see: records removed from the tail of a chain after its last checkpoint
//! together with a matching rewrite of its head; a whole chain removed with its head, its
//! checkpoints and the prune records naming it; and, with keys taken from the store rather
//! than given (`--trusted-key`), a log re-signed by someone who could also replace the
//! published public keys.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use haven_state::Store;
use serde::Serialize;

use crate::{AUDIT_NS, Checkpoint, Entry, Head, Pruned, PublicKey, ZERO_HASH, hash_hex, split_key};

/// What is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The record's content changed.
    Altered,
    /// Records are missing.
    Removed,
    /// A record sits at another place than its own.
    Reordered,
    /// A checkpoint's signature does not verify, or its key is not trusted.
    BadCheckpoint,
}

/// One finding, at a chain and sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The chain.
    pub chain: String,
    /// The sequence where it shows (the first record concerned).
    pub seq: u64,
    /// What.
    pub kind: ProblemKind,
    /// Said in words.
    pub detail: String,
}

/// One chain's summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChainSummary {
    /// The chain.
    pub chain: String,
    /// Records present.
    pub records: u64,
    /// First and last sequence present.
    pub first_seq: Option<u64>,
    /// Last sequence present.
    pub last_seq: Option<u64>,
    /// Records up to here were removed by a recorded prune.
    pub pruned_through: Option<u64>,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// Last sequence covered by a good checkpoint.
    pub checkpointed_through: Option<u64>,
}

/// The result of [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Whether nothing was found.
    pub ok: bool,
    /// Where the trusted keys came from: `store` or `given`.
    pub keys_from: String,
    /// The key ids checkpoints were checked against.
    pub keys: Vec<String>,
    /// Every chain.
    pub chains: Vec<ChainSummary>,
    /// Findings, ordered by chain and sequence: the first is the first bad record.
    pub problems: Vec<Problem>,
}

/// Verifies every chain in `store`. `trusted`: public keys (hex) to check checkpoints
/// against; empty: the keys published in the store.
pub async fn verify(
    store: &dyn Store,
    trusted: &[String],
) -> Result<VerifyReport, crate::AuditError> {
    let all = store.scan_all(AUDIT_NS, "").await?;
    let mut records: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    let mut checkpoints: Vec<(String, u64, Vec<u8>)> = Vec::new();
    let mut heads: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut published: BTreeMap<String, VerifyingKey> = BTreeMap::new();
    for r in &all {
        let key = r.record.key.as_str();
        let value = r.value().to_vec();
        if key.starts_with("r/") {
            if let Some((chain, seq)) = split_key(key) {
                records
                    .entry(chain.to_owned())
                    .or_default()
                    .push((seq, value));
            }
        } else if key.starts_with("c/") {
            if let Some((chain, seq)) = split_key(key) {
                checkpoints.push((chain.to_owned(), seq, value));
            }
        } else if let Some(chain) = key.strip_prefix("h/") {
            heads.insert(chain.to_owned(), value);
        } else if key.starts_with("k/")
            && let Ok(pk) = serde_json::from_slice::<PublicKey>(&value)
            && let Some(vk) = crate::key::parse_public(&pk.public_key)
            && crate::key::kid_of(&vk) == pk.kid
        {
            published.insert(pk.kid, vk);
        }
    }
    let (keys, keys_from) = if trusted.is_empty() {
        (published, "store")
    } else {
        let mut given = BTreeMap::new();
        for t in trusted {
            if let Some(vk) = crate::key::parse_public(t) {
                given.insert(crate::key::kid_of(&vk), vk);
            }
        }
        (given, "given")
    };

    // Prune explanations, from every chain's readable records: newest per chain.
    let mut pruned: BTreeMap<String, Pruned> = BTreeMap::new();
    for list in records.values() {
        for (_, bytes) in list {
            if let Ok(e) = serde_json::from_slice::<Entry>(bytes) {
                for p in e.pruned {
                    if pruned.get(&p.chain).is_none_or(|q| q.through < p.through) {
                        pruned.insert(p.chain.clone(), p);
                    }
                }
            }
        }
    }

    let mut problems = Vec::new();
    let mut summaries: BTreeMap<String, ChainSummary> = BTreeMap::new();
    let mut hashes: BTreeMap<(String, u64), String> = BTreeMap::new();
    let chains: BTreeSet<String> = records.keys().chain(heads.keys()).cloned().collect();
    for chain in &chains {
        let list = records.get(chain).map(Vec::as_slice).unwrap_or_default();
        let prune = pruned.get(chain);
        let sum = ChainSummary {
            chain: chain.clone(),
            records: list.len() as u64,
            first_seq: list.first().map(|r| r.0),
            last_seq: list.last().map(|r| r.0),
            pruned_through: prune.map(|p| p.through),
            ..ChainSummary::default()
        };
        let mut problem = |seq: u64, kind: ProblemKind, detail: String| {
            problems.push(Problem {
                chain: chain.clone(),
                seq,
                kind,
                detail,
            })
        };
        // The link the first record must carry, and the sequence before it.
        let mut prev: Option<(u64, String)> = None;
        for (i, (seq, bytes)) in list.iter().enumerate() {
            let seq = *seq;
            let hash = hash_hex(bytes);
            hashes.insert((chain.clone(), seq), hash.clone());
            let entry = serde_json::from_slice::<Entry>(bytes).ok();
            if i == 0 {
                // The chain's start: seq 1, or right after a recorded prune.
                match prune {
                    _ if seq == 1 => {}
                    Some(p) if seq == p.through + 1 => {
                        prev = Some((p.through, p.last_hash.clone()));
                    }
                    Some(p) if seq <= p.through => {}
                    Some(p) => problem(
                        p.through + 1,
                        ProblemKind::Removed,
                        format!(
                            "records {chain}/{}..{} are missing and no recorded prune explains them (the last prune removed up to {})",
                            p.through + 1,
                            seq - 1,
                            p.through
                        ),
                    ),
                    None => problem(
                        1,
                        ProblemKind::Removed,
                        format!(
                            "records {chain}/1..{} are missing and no recorded prune explains them",
                            seq - 1
                        ),
                    ),
                }
            } else if let Some((p, _)) = &prev
                && seq != p + 1
            {
                problem(
                    p + 1,
                    ProblemKind::Removed,
                    format!("records {chain}/{}..{} were removed", p + 1, seq - 1),
                );
            }
            match &entry {
                None => problem(
                    seq,
                    ProblemKind::Altered,
                    format!("record {chain}/{seq} was altered: it is not a readable audit record"),
                ),
                Some(e) if e.chain != *chain || e.seq != seq => problem(
                    seq,
                    ProblemKind::Reordered,
                    format!(
                        "the place of record {chain}/{seq} holds record {}/{}: records were moved or swapped",
                        e.chain, e.seq
                    ),
                ),
                Some(e) => {
                    let expected = match &prev {
                        Some((p, h)) if *p + 1 == seq => Some(h.clone()),
                        None if seq == 1 => Some(ZERO_HASH.to_owned()),
                        _ => None,
                    };
                    if let Some(h) = expected
                        && e.prev != h
                    {
                        let before = seq - 1;
                        if before == 0 || prune.is_some_and(|p| p.through == before) {
                            problem(
                                seq,
                                ProblemKind::Altered,
                                format!(
                                    "record {chain}/{seq} was altered: its link to the record before it is wrong"
                                ),
                            );
                        } else {
                            problem(
                                before,
                                ProblemKind::Altered,
                                format!(
                                    "record {chain}/{before} was altered: its hash is not the one record {chain}/{seq} links to"
                                ),
                            );
                        }
                    }
                }
            }
            prev = Some((seq, hash));
        }
        // The head: written with the chain's last record.
        if let Some(hb) = heads.get(chain) {
            match serde_json::from_slice::<Head>(hb) {
                Err(_) => problem(
                    sum.last_seq.unwrap_or(0),
                    ProblemKind::Altered,
                    format!("the head of chain {chain} is not readable"),
                ),
                Ok(h) => match &prev {
                    Some((last, hash)) if *last == h.seq && *hash != h.hash => problem(
                        *last,
                        ProblemKind::Altered,
                        format!(
                            "record {chain}/{last} was altered: it no longer hashes to what the chain's head recorded"
                        ),
                    ),
                    Some((last, _)) if *last < h.seq => problem(
                        last + 1,
                        ProblemKind::Removed,
                        format!(
                            "records {chain}/{}..{} were removed: the chain's head says it reached {}",
                            last + 1,
                            h.seq,
                            h.seq
                        ),
                    ),
                    Some((last, _)) if *last > h.seq => problem(
                        h.seq + 1,
                        ProblemKind::Altered,
                        format!(
                            "chain {chain} holds records after its head ({}..{}): records were added or the head was rewound",
                            h.seq + 1,
                            last
                        ),
                    ),
                    None if prune.is_none_or(|p| p.through < h.seq) => problem(
                        prune.map(|p| p.through + 1).unwrap_or(1),
                        ProblemKind::Removed,
                        format!(
                            "every record of chain {chain} is missing (its head says it reached {}) and no recorded prune explains it",
                            h.seq
                        ),
                    ),
                    _ => {}
                },
            }
        }
        summaries.insert(chain.clone(), sum);
    }

    for (chain, seq, bytes) in &checkpoints {
        let (chain, seq) = (chain.clone(), *seq);
        let mut bad = |kind, detail| {
            problems.push(Problem {
                chain: chain.clone(),
                seq,
                kind,
                detail,
            })
        };
        let Ok(cp) = serde_json::from_slice::<Checkpoint>(bytes) else {
            bad(
                ProblemKind::BadCheckpoint,
                format!("the checkpoint at {chain}/{seq} is not readable"),
            );
            continue;
        };
        if cp.chain != chain || cp.seq != seq {
            bad(
                ProblemKind::BadCheckpoint,
                format!(
                    "the checkpoint at {chain}/{seq} is the one of {}/{}: checkpoints were moved",
                    cp.chain, cp.seq
                ),
            );
            continue;
        }
        let Some(vk) = keys.get(&cp.kid) else {
            bad(
                ProblemKind::BadCheckpoint,
                format!(
                    "the checkpoint at {chain}/{seq} is signed by key {}, which is not {}",
                    cp.kid,
                    if keys_from == "store" {
                        "published in the store"
                    } else {
                        "one of the trusted keys given"
                    }
                ),
            );
            continue;
        };
        let msg = Checkpoint::message(&cp.chain, cp.seq, &cp.hash, cp.at_millis, &cp.kid);
        let sig = hex::decode(&cp.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b));
        if sig.is_none_or(|s| vk.verify(&msg, &s).is_err()) {
            bad(
                ProblemKind::BadCheckpoint,
                format!(
                    "the signature of the checkpoint at {chain}/{seq} (key {}) does not verify: the checkpoint was altered",
                    cp.kid
                ),
            );
            continue;
        }
        match hashes.get(&(chain.clone(), seq)) {
            Some(h) if *h != cp.hash => bad(
                ProblemKind::Altered,
                format!(
                    "record {chain}/{seq} does not match its signed checkpoint: it (or records before it, with their links) was rewritten"
                ),
            ),
            _ => {
                if let Some(s) = summaries.get_mut(&chain) {
                    s.checkpoints += 1;
                    if hashes.contains_key(&(chain.clone(), seq)) {
                        s.checkpointed_through = s.checkpointed_through.max(Some(seq));
                    }
                }
            }
        }
    }
    problems.sort_by(|a, b| (&a.chain, a.seq).cmp(&(&b.chain, b.seq)));
    Ok(VerifyReport {
        ok: problems.is_empty(),
        keys_from: keys_from.to_owned(),
        keys: keys.keys().cloned().collect(),
        chains: summaries.into_values().collect(),
        problems,
    })
}
