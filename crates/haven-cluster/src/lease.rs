//! A role one node of a region holds at a time (the backup shipper), kept by a lease record
//! whose expiry does not trust wall clocks: a holder renews it by rewriting the record, and
//! another node takes it over only after it has seen the record unchanged for the lease's
//! time-to-live on its own monotonic clock.

use std::sync::Arc;
use std::time::Duration;

use haven_state::{Batch, Expect, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The content of a lease record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds it.
    pub holder: String,
    /// The holder's time-to-live, in milliseconds (informational: others measure their own).
    pub ttl_millis: u64,
    /// Renewals so far (every renewal changes the record).
    pub renewals: u64,
}

/// One node's side of a lease.
pub struct Lease {
    store: Arc<dyn Store>,
    namespace: String,
    key: String,
    holder: String,
    ttl: Duration,
    /// The other holder's record revision and when this node first saw it.
    watched: Option<(u64, Instant)>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("holder", &self.holder)
            .finish()
    }
}

/// What [`Lease::hold`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holding {
    /// This node holds the lease (took or renewed it).
    Held {
        /// Whether it was just taken (not renewed).
        taken: bool,
    },
    /// Another holder's lease is live.
    Standby {
        /// That holder.
        holder: String,
    },
}

impl Lease {
    /// The lease `namespace`/`key` as `holder`, renewed at least every `ttl / 3`.
    pub fn new(
        store: Arc<dyn Store>,
        namespace: &str,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Lease {
        Lease {
            store,
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            holder: holder.to_owned(),
            ttl,
            watched: None,
        }
    }

    /// Takes or renews the lease if this node may.
    pub async fn hold(&mut self) -> Result<Holding, StoreError> {
        let current = self.store.get(&self.namespace, &self.key).await?;
        let (expect, renewals, taken) = match &current {
            None => (Expect::Absent, 0, true),
            Some(r) => {
                let rec = serde_json::from_slice::<LeaseRecord>(r.value()).ok();
                match rec {
                    Some(l) if l.holder == self.holder => {
                        self.watched = None;
                        (Expect::Revision(r.revision), l.renewals + 1, false)
                    }
                    Some(l) => {
                        let now = Instant::now();
                        let since = match self.watched {
                            Some((rev, at)) if rev == r.revision => at,
                            _ => {
                                self.watched = Some((r.revision, now));
                                now
                            }
                        };
                        if now.duration_since(since) < self.ttl {
                            return Ok(Holding::Standby { holder: l.holder });
                        }
                        (Expect::Revision(r.revision), 0, true)
                    }
                    None => (Expect::Revision(r.revision), 0, true),
                }
            }
        };
        let record = LeaseRecord {
            holder: self.holder.clone(),
            ttl_millis: self.ttl.as_millis() as u64,
            renewals,
        };
        let batch = Batch::new().put_if(
            &self.namespace,
            &self.key,
            serde_json::to_vec(&record).expect("lease serializes"),
            expect,
        );
        match self.store.commit(batch).await {
            Ok(_) => {
                self.watched = None;
                Ok(Holding::Held { taken })
            }
            Err(StoreError::Conflict { .. }) => Ok(Holding::Standby {
                holder: "another node".into(),
            }),
            Err(e) => Err(e),
        }
    }
}
