//! The change hub: one task per node reads the store's change feed and wakes whoever waits for
//! a key or a stream. Everything that crosses requests (replies to server-to-client requests,
//! cancellations, resumed streams, list changes, key rotation) travels through the store and
//! reaches waiters here, so it works the same whichever node wrote it.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use haven_state::{Change, LogEntry, Store};
use parking_lot::Mutex;
use tokio::sync::broadcast;

/// What a hub subscriber listens to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Changes of one record.
    Key {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
    },
    /// Every change in a namespace.
    Namespace(String),
    /// Events appended to one stream.
    Stream(String),
}

impl Topic {
    /// Topic of one record.
    pub fn key(namespace: &str, key: &str) -> Topic {
        Topic::Key {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
        }
    }
}

/// Routes committed changes to subscribers by topic.
#[derive(Clone, Default)]
pub struct Hub {
    topics: Arc<Mutex<HashMap<Topic, broadcast::Sender<Arc<LogEntry>>>>>,
}

impl Hub {
    /// A hub with no subscriber.
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Starts routing the live change feed of `store`; the task ends with the store's feed.
    pub fn start(&self, store: Arc<dyn Store>) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        let mut rx = store.subscribe();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(entry) => hub.route(&entry),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Waiters re-check the store after every wake-up, so waking everyone is
                        // a correct (if blunt) answer to missed entries.
                        tracing::warn!(missed = n, "change hub lagged; waking every subscriber");
                        hub.wake_all();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    }

    /// Starts routing from a watch (used when changes arrive from another process).
    pub fn start_watch(&self, store: Arc<dyn Store>, from_seq: u64) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut w = haven_state::watch(store, from_seq);
            while let Some(item) = w.next().await {
                match item {
                    Ok(entry) => hub.route(&entry),
                    Err(e) => {
                        tracing::warn!(error = %e, "change watch failed");
                        break;
                    }
                }
            }
        })
    }

    /// Subscribes to `topic`. Subscribe before reading the state you wait on, then re-read
    /// after every message, so that no change can slip between the read and the wait.
    pub fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Arc<LogEntry>> {
        let mut topics = self.topics.lock();
        topics
            .entry(topic)
            .or_insert_with(|| broadcast::channel(64).0)
            .subscribe()
    }

    /// Delivers one committed change to its subscribers.
    pub fn route(&self, entry: &Arc<LogEntry>) {
        let mut topics = self.topics.lock();
        let mut send = |t: Topic| {
            if let Some(tx) = topics.get(&t)
                && tx.send(entry.clone()).is_err()
            {
                topics.remove(&t);
            }
        };
        match &entry.change {
            Change::Record(r) => {
                send(Topic::Key {
                    namespace: r.namespace.clone(),
                    key: r.key.clone(),
                });
                send(Topic::Namespace(r.namespace.clone()));
            }
            Change::Event(e) => send(Topic::Stream(e.stream.clone())),
        }
    }

    fn wake_all(&self) {
        let topics = self.topics.lock();
        let marker = Arc::new(LogEntry {
            seq: 0,
            change: Change::Event(haven_state::StreamEvent {
                stream: String::new(),
                index: 0,
                version: haven_state::Version {
                    hlc: haven_state::Hlc::ZERO,
                    origin: haven_state::Origin::new("", ""),
                },
                data: Vec::new(),
            }),
        });
        for tx in topics.values() {
            let _ = tx.send(marker.clone());
        }
    }
}
