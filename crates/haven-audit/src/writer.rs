//! The background writer of one node's chain: takes queued events, links them, commits them in
//! batches together with the chain's head (conditionally on the head it read, so that two
//! writers of one chain cannot interleave), and signs checkpoints.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use haven_state::{Batch, Expect, Outcome as StoreOutcome, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Actor, AuditConfig, AuditError, Checkpoint, Entry, Event, Head, Msg, Outcome, Pruned, Shared,
    Target, actions, checkpoint_key, hash_hex, head_key, record_key,
};

struct Pending {
    event: Event,
    at: u64,
    hlc: u64,
    pruned: Vec<Pruned>,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    key: SigningKey,
    kid: String,
    seq: u64,
    hash: String,
    at: u64,
    head_expect: Expect,
    checkpointed: u64,
    batch: usize,
    checkpoint_every: u64,
}

fn take(
    m: Msg,
    pending: &mut Vec<Pending>,
    waiters: &mut Vec<oneshot::Sender<()>>,
    checkpoint: &mut bool,
    close: &mut bool,
) {
    match m {
        Msg::Event(event, at, hlc, pruned, done) => {
            pending.push(Pending {
                event,
                at,
                hlc,
                pruned,
            });
            waiters.extend(done);
        }
        Msg::Flush(done) => waiters.push(done),
        Msg::Checkpoint(done) => {
            *checkpoint = true;
            waiters.push(done);
        }
        Msg::Close(done) => {
            *close = true;
            waiters.push(done);
        }
    }
}

impl Writer {
    pub(crate) async fn open(
        shared: Arc<Shared>,
        key: SigningKey,
        kid: String,
        config: &AuditConfig,
    ) -> Result<Writer, AuditError> {
        let mut w = Writer {
            shared,
            key,
            kid,
            seq: 0,
            hash: crate::ZERO_HASH.into(),
            at: 0,
            head_expect: Expect::Absent,
            checkpointed: 0,
            batch: config.batch.max(1),
            checkpoint_every: config.checkpoint_every.max(1),
        };
        w.reload().await?;
        w.checkpointed = w.seq;
        Ok(w)
    }

    /// Reads the chain's head from the store.
    async fn reload(&mut self) -> Result<(), AuditError> {
        let store = &self.shared.store;
        match store
            .get(crate::AUDIT_NS, &head_key(&self.shared.chain))
            .await?
        {
            Some(r) => {
                let h: Head = serde_json::from_slice(r.value())
                    .map_err(|e| AuditError::Corrupt(format!("chain head: {e}")))?;
                self.seq = h.seq;
                self.hash = h.hash;
                self.at = h.at_millis;
                self.head_expect = Expect::Revision(r.revision);
            }
            None => {
                self.seq = 0;
                self.hash = crate::ZERO_HASH.into();
                self.head_expect = Expect::Absent;
            }
        }
        Ok(())
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        // Looks once a second (or per interval, if shorter) whether a checkpoint is due.
        let period = Duration::from_millis(
            self.shared
                .checkpoint_interval_ms
                .load(Ordering::Relaxed)
                .clamp(10, 1000),
        );
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut signed_at = tokio::time::Instant::now();
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = tick.tick() => {
                    let every = Duration::from_millis(
                        self.shared.checkpoint_interval_ms.load(Ordering::Relaxed),
                    );
                    if self.seq > self.checkpointed && signed_at.elapsed() >= every {
                        self.commit_with_retry(Vec::new(), true).await;
                        signed_at = tokio::time::Instant::now();
                    }
                    continue;
                }
            };
            let mut pending = Vec::new();
            let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
            let mut checkpoint = false;
            let mut close = false;
            take(
                first,
                &mut pending,
                &mut waiters,
                &mut checkpoint,
                &mut close,
            );
            while pending.len() < self.batch && !close {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut pending, &mut waiters, &mut checkpoint, &mut close),
                    Err(_) => break,
                }
            }
            let dropped = self.shared.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                let (at, hlc) = {
                    let c = self.shared.store.clock();
                    (c.wall_millis(), c.now().0)
                };
                pending.insert(
                    0,
                    Pending {
                        event: Event::new(
                            Actor::System,
                            actions::AUDIT_DROPPED,
                            Target::named("events", &dropped.to_string()),
                            Outcome::Error("the audit queue was full"),
                        ),
                        at,
                        hlc,
                        pruned: Vec::new(),
                    },
                );
            }
            let due = self.seq + pending.len() as u64 >= self.checkpointed + self.checkpoint_every;
            self.commit_with_retry(pending, checkpoint || due || close)
                .await;
            if checkpoint || due {
                signed_at = tokio::time::Instant::now();
            }
            if close {
                rx.close();
                // What was queued before the close is written; the rest is dropped, counted.
                let mut rest = Vec::new();
                let (mut a, mut b) = (false, false);
                while let Ok(m) = rx.try_recv() {
                    take(m, &mut rest, &mut waiters, &mut a, &mut b);
                }
                self.shared
                    .dropped_total
                    .fetch_add(rest.len() as u64, Ordering::Relaxed);
                for w in waiters {
                    let _ = w.send(());
                }
                return;
            }
            for w in waiters {
                let _ = w.send(());
            }
        }
        // The queue closed (the node stops): sign what was written.
        if self.seq > self.checkpointed {
            self.commit_with_retry(Vec::new(), true).await;
        }
    }

    /// Commits `pending` (and a checkpoint when asked), retrying while the store is
    /// unavailable; a batch the store refuses outright is dropped, counted and logged.
    async fn commit_with_retry(&mut self, pending: Vec<Pending>, checkpoint: bool) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.commit(&pending, checkpoint).await {
                Ok(()) => return,
                Err(StoreError::Conflict { .. }) => {
                    // Another writer moved the head (or an earlier attempt landed): start from
                    // the stored head and link the batch again.
                    tracing::warn!(chain = %self.shared.chain, "the audit chain's head moved under this writer; relinking");
                    if let Err(e) = self.reload().await {
                        tracing::warn!(error = %e, "reading the audit chain's head failed");
                        tokio::time::sleep(backoff).await;
                    }
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "writing audit records failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(error = %e, records = pending.len(), "the store refused audit records; they are dropped (counted in audit.dropped)");
                    self.shared
                        .dropped
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    self.shared
                        .dropped_total
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    async fn commit(&mut self, pending: &[Pending], checkpoint: bool) -> Result<(), StoreError> {
        let s = &self.shared;
        let mut batch = Batch::new();
        let mut seq = self.seq;
        let mut hash = self.hash.clone();
        let mut at = self.at;
        for p in pending {
            seq += 1;
            let e = Entry {
                chain: s.chain.clone(),
                seq,
                prev: hash,
                at_millis: p.at,
                hlc: p.hlc,
                principal: p.event.actor.id(),
                action: p.event.action.to_owned(),
                target: p.event.target.as_str().to_owned(),
                outcome: p.event.outcome.text(),
                trace_id: p.event.trace_id.clone(),
                node: s.node.clone(),
                region: s.region.clone(),
                pruned: p.pruned.clone(),
            };
            let bytes = serde_json::to_vec(&e).expect("an audit record serializes");
            hash = hash_hex(&bytes);
            at = p.at;
            batch = batch.put(crate::AUDIT_NS, &record_key(&s.chain, seq), bytes);
        }
        let sign = checkpoint && seq > 0 && seq > self.checkpointed;
        if sign {
            let now = s.store.clock().wall_millis();
            let msg = Checkpoint::message(&s.chain, seq, &hash, now, &self.kid);
            let cp = Checkpoint {
                chain: s.chain.clone(),
                seq,
                hash: hash.clone(),
                at_millis: now,
                kid: self.kid.clone(),
                signature: hex::encode(self.key.sign(&msg).to_bytes()),
            };
            batch = batch.put(
                crate::AUDIT_NS,
                &checkpoint_key(&s.chain, seq),
                serde_json::to_vec(&cp).expect("a checkpoint serializes"),
            );
        }
        if batch.is_empty() {
            return Ok(());
        }
        let head = Head {
            chain: s.chain.clone(),
            seq,
            hash: hash.clone(),
            at_millis: at,
        };
        let head_op = batch.ops.len();
        batch = batch.put_if(
            crate::AUDIT_NS,
            &head_key(&s.chain),
            serde_json::to_vec(&head).expect("a head serializes"),
            self.head_expect,
        );
        let commit = s.store.commit(batch).await?;
        if let Some(StoreOutcome::Written { revision }) = commit.outcomes.get(head_op) {
            self.head_expect = Expect::Revision(*revision);
        }
        s.written.fetch_add(pending.len() as u64, Ordering::Relaxed);
        self.seq = seq;
        self.hash = hash;
        self.at = at;
        if sign {
            self.checkpointed = seq;
        }
        Ok(())
    }
}
