//! The change hub: one task per node reads the store's change feed and wakes whoever waits for
//! a key or a stream. Everything that crosses requests (replies to server-to-client requests,
//! cancellations, resumed streams, list changes, key rotation) travels through the store and
//! reaches waiters here, so it works the same whichever node wrote it.
//!
//! Whoever waits for state in the store to change uses [`Hub::wait_until`]: subscribe first,
//! then read the state, then wait for a change (or a re-check interval, or a reason to stop),
//! and read again.

use std::collections::HashMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

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

/// What woke a check of [`Hub::wait_until`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woke {
    /// The first check, before any wait.
    First,
    /// A change of the topic at this index of the waiter's topics (or changes the hub missed,
    /// which may have been of it).
    Changed(usize),
    /// The re-check interval passed without a change (a change the feed missed is found).
    Recheck,
}

/// Routes committed changes to subscribers by topic.
#[derive(Clone, Default)]
pub struct Hub {
    topics: Arc<Mutex<Topics>>,
}

/// The hub's table: a sender per topic somebody listens to. A topic is removed with its
/// last [`Subscription`]: most topics are one request's, so the table is as large as what is
/// being waited for now, not as the traffic so far.
#[derive(Default)]
struct Topics {
    map: HashMap<Topic, broadcast::Sender<Arc<LogEntry>>>,
}

/// A subscription to one topic of the [`Hub`]: a receiver of its changes (it derefs to the
/// `broadcast::Receiver`). Dropping the last subscription of a topic removes the topic.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<LogEntry>>,
    topic: Topic,
    topics: Arc<Mutex<Topics>>,
}

impl std::ops::Deref for Subscription {
    type Target = broadcast::Receiver<Arc<LogEntry>>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl std::ops::DerefMut for Subscription {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut topics = self.topics.lock();
        // Under the lock nobody subscribes meanwhile: a count of one is this receiver.
        if topics
            .map
            .get(&self.topic)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            topics.map.remove(&self.topic);
        }
    }
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
    pub fn subscribe(&self, topic: Topic) -> Subscription {
        let rx = self
            .topics
            .lock()
            .map
            .entry(topic.clone())
            .or_insert_with(|| broadcast::channel(64).0)
            .subscribe();
        Subscription {
            rx,
            topic,
            topics: self.topics.clone(),
        }
    }

    /// How many topics somebody listens to now.
    pub fn topics(&self) -> usize {
        self.topics.lock().map.len()
    }

    /// Re-reads state until it is as wanted. Subscribes to `topics` first, then calls `check`;
    /// while `check` continues, waits for a change of any topic, for `recheck` to pass, or for
    /// `stop`, and calls `check` again. Because the subscription comes before the first read,
    /// no change can slip between a read and the wait. `state` goes from one check to the next
    /// (a cursor, say). Returns what `check` broke with, or `stop`'s output if it completed
    /// first.
    pub async fn wait_until<S, T, R, F, Fut>(
        &self,
        topics: &[Topic],
        recheck: Duration,
        stop: impl Future<Output = R>,
        mut state: S,
        mut check: F,
    ) -> Result<T, R>
    where
        F: FnMut(S, Woke) -> Fut,
        Fut: Future<Output = ControlFlow<T, S>>,
    {
        let mut receivers: Vec<_> = topics
            .iter()
            .map(|t| Some(self.subscribe(t.clone())))
            .collect();
        let mut stop = std::pin::pin!(stop);
        let mut woke = Woke::First;
        loop {
            state = match check(state, woke).await {
                ControlFlow::Break(t) => return Ok(t),
                ControlFlow::Continue(s) => s,
            };
            woke = tokio::select! {
                i = changed(&mut receivers) => Woke::Changed(i),
                r = &mut stop => return Err(r),
                () = tokio::time::sleep(recheck) => Woke::Recheck,
            };
        }
    }

    /// Delivers one committed change to its subscribers.
    pub fn route(&self, entry: &Arc<LogEntry>) {
        let mut topics = self.topics.lock();
        let mut send = |t: Topic| {
            if let Some(tx) = topics.map.get(&t)
                && tx.send(entry.clone()).is_err()
            {
                topics.map.remove(&t);
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
        for tx in topics.map.values() {
            let _ = tx.send(marker.clone());
        }
    }
}

/// Waits for a message on any of `receivers`; returns its index. A lag counts as a change; a
/// closed channel (which cannot happen while the hub lives) is not listened to again.
async fn changed(receivers: &mut [Option<Subscription>]) -> usize {
    loop {
        let live: Vec<_> = receivers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, rx)| {
                rx.as_mut()
                    .map(|rx| Box::pin(async move { (i, rx.recv().await) }))
            })
            .collect();
        if live.is_empty() {
            return std::future::pending().await;
        }
        let ((i, r), _, _) = futures::future::select_all(live).await;
        if let Err(broadcast::error::RecvError::Closed) = r {
            receivers[i] = None;
            continue;
        }
        return i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiter that checks once, then breaks on the next wake-up with what woke it.
    async fn second_wake(hub: &Hub, recheck: Duration) -> Result<Woke, ()> {
        let topics = [Topic::key("ns", "a"), Topic::key("ns", "b")];
        let check = |checked: bool, woke| async move {
            if checked {
                ControlFlow::Break(woke)
            } else {
                ControlFlow::Continue(true)
            }
        };
        let stop = std::future::pending::<()>();
        hub.wait_until(&topics, recheck, stop, false, check).await
    }

    #[tokio::test]
    async fn a_change_of_any_topic_wakes_the_waiter() {
        let hub = Hub::new();
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { second_wake(&hub, Duration::from_secs(3600)).await }
        });
        // Once it subscribed (before its first check), a change of its second topic.
        while !hub.topics.lock().map.contains_key(&Topic::key("ns", "b")) {
            tokio::task::yield_now().await;
        }
        let tx = hub.topics.lock().map[&Topic::key("ns", "b")].clone();
        let _ = tx.send(Arc::new(LogEntry {
            seq: 1,
            change: Change::Event(haven_state::StreamEvent {
                stream: "s".into(),
                index: 0,
                version: haven_state::Version {
                    hlc: haven_state::Hlc::ZERO,
                    origin: haven_state::Origin::new("r", "n"),
                },
                data: Vec::new(),
            }),
        }));
        assert_eq!(waiter.await.unwrap(), Ok(Woke::Changed(1)));
    }

    fn entry_of(namespace: &str, key: &str) -> Arc<LogEntry> {
        Arc::new(LogEntry {
            seq: 1,
            change: Change::Record(haven_state::Record {
                namespace: namespace.into(),
                key: key.into(),
                version: haven_state::Version {
                    hlc: haven_state::Hlc::ZERO,
                    origin: haven_state::Origin::new("r", "n"),
                },
                value: Some(vec![1]),
                expires_at_millis: None,
            }),
        })
    }

    #[test]
    fn a_topic_is_removed_with_its_last_subscription() {
        let hub = Hub::new();
        let mut kept = hub.subscribe(Topic::key("ns", "kept"));
        // One topic per request, its subscriber gone with the request, no change ever after.
        for i in 0..20_000 {
            drop(hub.subscribe(Topic::key("cancels", &format!("request-{i}"))));
        }
        assert_eq!(hub.topics(), 1);
        // Two subscriptions of one topic: it stays until the second goes.
        let a = hub.subscribe(Topic::key("ns", "shared"));
        let mut b = hub.subscribe(Topic::key("ns", "shared"));
        drop(a);
        assert_eq!(hub.topics(), 2);
        hub.route(&entry_of("ns", "shared"));
        assert!(b.try_recv().is_ok());
        drop(b);
        assert_eq!(hub.topics(), 1);
        // The topic still listened to still gets its changes.
        hub.route(&entry_of("ns", "kept"));
        assert!(kept.try_recv().is_ok());
        drop(kept);
        assert_eq!(hub.topics(), 0);
    }

    #[tokio::test]
    async fn without_a_change_the_state_is_read_again_after_the_interval() {
        let hub = Hub::new();
        let woke = second_wake(&hub, Duration::from_millis(10)).await;
        assert_eq!(woke, Ok(Woke::Recheck));
    }

    #[tokio::test]
    async fn stop_ends_the_wait_with_its_output() {
        let hub = Hub::new();
        let never = |(), _| async { ControlFlow::<(), ()>::Continue(()) };
        let topics = [Topic::Namespace("ns".into())];
        let stop = async { "stopped" };
        let r = hub
            .wait_until(&topics, Duration::from_secs(3600), stop, (), never)
            .await;
        assert_eq!(r, Err("stopped"));
    }
}
