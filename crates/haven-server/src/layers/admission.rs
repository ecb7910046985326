//! Admission control: a node serves at most `limits.max_requests` `/mcp` requests at once
//! (an open response stream counts until it ends), and one session at most
//! `limits.max_requests_per_session`. A request over the node's limit waits in a bounded
//! queue for a short while; when the queue is full or the wait runs out it is answered 503,
//! and a session over its own limit 429 — both at once, with `Retry-After: 1`, so that
//! overload never turns into unbounded memory or latency.
//!
//! Those limits count requests the engine serves. On a node whose CPU is the bottleneck the
//! excess waits earlier, for a turn on the runtime's workers (its connection's task queued,
//! before its request is even read), and no count sees it. So the node also measures that
//! wait: a thread of its own ([`Admission::start_delay_probe`]) hands the runtime a task
//! every 100 ms and records how long the task takes to get through the runtime's queues (the
//! shared queue that new and overflowing tasks wait in, then the back of a worker's own
//! queue, where connections woken by I/O wait).
//! When the delay has stayed above `limits.max_queue_delay_ms` for a whole second (not one
//! late sample: the "standing queue" test of CoDel), a share of the new requests is answered
//! 503 at once, before their bodies are read; the share grows by a tenth per late sample (to
//! at most 95 %) and shrinks by a twentieth per timely one, so the node keeps serving what it
//! can at a bounded delay instead of serving everything late. The shed requests are picked
//! by a counter, not at random: the same samples shed the same requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;

/// The limits, shared with whoever changes them at runtime.
#[derive(Debug)]
pub struct AdmissionLimits {
    /// Requests (and open response streams) a node serves at once.
    pub max_requests: AtomicUsize,
    /// Requests that wait for a place when the node is at its limit.
    pub max_queued: AtomicUsize,
    /// How long a queued request waits for a place, milliseconds.
    pub queue_wait_ms: AtomicU64,
    /// Requests (and open response streams) of one session at once.
    pub max_requests_per_session: AtomicUsize,
    /// The longest a node's runtime may keep work waiting before new requests are shed,
    /// milliseconds (0: never shed by delay).
    pub max_queue_delay_ms: AtomicU64,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_requests: AtomicUsize::new(4096),
            max_queued: AtomicUsize::new(1024),
            queue_wait_ms: AtomicU64::new(1000),
            max_requests_per_session: AtomicUsize::new(64),
            max_queue_delay_ms: AtomicU64::new(DEFAULT_MAX_QUEUE_DELAY_MS),
        }
    }
}

/// The default of `limits.max_queue_delay_ms`.
pub const DEFAULT_MAX_QUEUE_DELAY_MS: u64 = 250;

/// How often the delay probe samples the runtime's delay.
pub const PROBE_PERIOD: Duration = Duration::from_millis(100);

/// How long the delay must stay above its limit before shedding starts.
pub const SHED_INTERVAL: Duration = Duration::from_secs(1);

/// The largest share of new requests shed, per mille (some always get through, so that the
/// node's answers show when the overload ends).
pub const MAX_SHED_PERMILLE: u32 = 950;

/// Shedding by delay: fed one sample at a time, it says which share of new requests to shed.
/// Pure: time is the caller's.
#[derive(Debug, Default)]
pub struct DelayShedder {
    /// When the delay went above its limit without a timely sample since.
    above_since: Option<Instant>,
    /// The share shed now, per mille.
    share: u32,
}

impl DelayShedder {
    /// Takes the delay measured at `now` against the limit `max` (zero: shedding off) and
    /// returns the share of new requests to shed, per mille.
    pub fn observe(&mut self, now: Instant, delay: Duration, max: Duration) -> u32 {
        if max.is_zero() {
            self.above_since = None;
            self.share = 0;
        } else if delay > max {
            let since = *self.above_since.get_or_insert(now);
            if now.duration_since(since) >= SHED_INTERVAL {
                self.share = (self.share + 100).min(MAX_SHED_PERMILLE);
            }
        } else {
            self.above_since = None;
            self.share = self.share.saturating_sub(50);
        }
        self.share
    }
}

/// The admission state of one node: what runs, what waits.
#[derive(Debug, Default)]
pub struct Admission {
    /// The limits in force.
    pub limits: Arc<AdmissionLimits>,
    counts: Mutex<Counts>,
    freed: tokio::sync::Notify,
    /// The share of new requests shed for delay, per mille.
    shed_share: AtomicU32,
    /// Adds the share per request; each time it passes 1000 a request is shed.
    shed_acc: AtomicU32,
    /// The last delay the probe measured, microseconds.
    delay_us: AtomicU64,
}

#[derive(Debug, Default)]
struct Counts {
    running: usize,
    queued: usize,
    per_session: HashMap<String, usize>,
}

impl Admission {
    /// Admission with `limits`.
    pub fn new(limits: Arc<AdmissionLimits>) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            ..Default::default()
        })
    }

    /// Requests running now and requests waiting.
    pub fn load(&self) -> (usize, usize) {
        let c = self.counts();
        (c.running, c.queued)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The runtime's delay the probe measured last, and the share of new requests shed for
    /// it (per mille).
    pub fn delay(&self) -> (Duration, u32) {
        (
            Duration::from_micros(self.delay_us.load(Ordering::Relaxed)),
            self.shed_share.load(Ordering::Relaxed),
        )
    }

    /// Records a delay sample and the share to shed for it.
    fn record_delay(&self, delay: Duration, share: u32) {
        self.delay_us.store(
            u64::try_from(delay.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.shed_share.store(share, Ordering::Relaxed);
        if let Some(m) = haven_telemetry::get() {
            m.scheduling_delay.set(delay.as_secs_f64());
        }
    }

    /// Starts the delay probe: a thread that hands `runtime` a task every [`PROBE_PERIOD`],
    /// records how long the task waits for its turns, and sheds new requests while that
    /// delay stands above `limits.max_queue_delay_ms` (see the module's text). The thread
    /// ends when the runtime does.
    pub fn start_delay_probe(
        self: &Arc<Self>,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let admission = self.clone();
        std::thread::Builder::new()
            .name("haven-delay-probe".into())
            .spawn(move || {
                let mut shedder = DelayShedder::default();
                loop {
                    std::thread::sleep(PROBE_PERIOD);
                    let Some(delay) = queue_wait(&runtime) else {
                        return;
                    };
                    let max = Duration::from_millis(
                        admission.limits.max_queue_delay_ms.load(Ordering::Relaxed),
                    );
                    let share = shedder.observe(Instant::now(), delay, max);
                    admission.record_delay(delay, share);
                }
            })
    }

    /// Refuses this request if it is one of the share shed for delay.
    pub(crate) fn shed(&self) -> Result<(), Refusal> {
        if !self.shed_for_delay() {
            return Ok(());
        }
        let (delay, _) = self.delay();
        Err(Refusal::Delay {
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            max_ms: self.limits.max_queue_delay_ms.load(Ordering::Relaxed),
        })
    }

    /// Whether this request is one of the share shed for delay.
    fn shed_for_delay(&self) -> bool {
        let share = self.shed_share.load(Ordering::Relaxed);
        if share == 0 {
            return false;
        }
        let before = self
            .shed_acc
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                Some((a + share) % 1000)
            })
            .unwrap_or(0);
        before + share >= 1000
    }

    /// Takes a place for a request of `session`, or says why not.
    fn try_admit(self: &Arc<Self>, session: Option<&str>) -> Result<Place, Refusal> {
        let max = self.limits.max_requests.load(Ordering::Relaxed);
        let per_session = self.limits.max_requests_per_session.load(Ordering::Relaxed);
        let mut c = self.counts();
        if let Some(s) = session
            && c.per_session.get(s).copied().unwrap_or(0) >= per_session
        {
            return Err(Refusal::Session(per_session));
        }
        if c.running >= max {
            return Err(Refusal::Node(max));
        }
        c.running += 1;
        if let Some(s) = session {
            *c.per_session.entry(s.to_owned()).or_default() += 1;
        }
        Ok(Place {
            admission: self.clone(),
            session: session.map(str::to_owned),
        })
    }

    /// A place, waiting in the queue for one if the node is at its limit.
    pub(crate) async fn admit(self: &Arc<Self>, session: Option<&str>) -> Result<Place, Refusal> {
        match self.try_admit(session) {
            Err(Refusal::Node(max)) => {
                {
                    let mut c = self.counts();
                    if c.queued >= self.limits.max_queued.load(Ordering::Relaxed) {
                        return Err(Refusal::Node(max));
                    }
                    c.queued += 1;
                }
                let wait = Duration::from_millis(self.limits.queue_wait_ms.load(Ordering::Relaxed));
                let waited = tokio::time::timeout(wait, async {
                    loop {
                        let freed = self.freed.notified();
                        match self.try_admit(session) {
                            Err(Refusal::Node(_)) => freed.await,
                            other => return other,
                        }
                    }
                })
                .await;
                self.counts().queued -= 1;
                waited.unwrap_or(Err(Refusal::Node(max)))
            }
            other => other,
        }
    }
}

/// How long a task handed to `runtime` from outside it waits: first in the runtime's shared
/// (injection) queue, where tasks from outside and the overflow of busy workers wait, then
/// at the back of a worker's own queue. `None` once the runtime has shut down.
fn queue_wait(runtime: &tokio::runtime::Handle) -> Option<Duration> {
    hand_probe(runtime).1.recv().ok()
}

/// Hands `runtime` the probe's task: when it was handed, and where its wait will come.
fn hand_probe(runtime: &tokio::runtime::Handle) -> (Instant, std::sync::mpsc::Receiver<Duration>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handed = Instant::now();
    runtime.spawn(async move {
        BackOfTheQueue::default().await;
        let _ = tx.send(handed.elapsed());
    });
    (handed, rx)
}

/// Ready on its second poll: on the first it wakes its own task before returning
/// `Pending`, which a tokio worker treats as a yield and schedules at the back of its run
/// queue (not in the LIFO slot, and not deferred like `tokio::task::yield_now`).
#[derive(Default)]
struct BackOfTheQueue {
    polled: bool,
}

impl std::future::Future for BackOfTheQueue {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.polled {
            return std::task::Poll::Ready(());
        }
        self.polled = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// A request's place; freed when its response (stream) ends.
pub(crate) struct Place {
    admission: Arc<Admission>,
    session: Option<String>,
}

impl Place {
    /// `response`, holding this place until its body (an SSE stream included) ends or the
    /// client leaves.
    pub(crate) fn hold(self, response: Response) -> Response {
        response.map(|body| {
            Body::new(body.map_err(move |e| {
                let _held = &self;
                e
            }))
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.running -= 1;
        if let Some(s) = &self.session
            && let Some(n) = c.per_session.get_mut(s)
        {
            *n -= 1;
            if *n == 0 {
                c.per_session.remove(s);
            }
        }
        drop(c);
        self.admission.freed.notify_one();
    }
}

/// Why a request was not admitted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The node serves its maximum of requests and its queue is full or the wait ran out.
    #[error(
        "Service Unavailable: this node serves its maximum of {0} requests at once (setting limits.max_requests); retry later"
    )]
    Node(usize),
    /// The session has its maximum of requests in flight.
    #[error(
        "Too Many Requests: this session has its maximum of {0} requests in flight (setting limits.max_requests_per_session); retry once one ends"
    )]
    Session(usize),
    /// The node's runtime keeps work waiting longer than its limit: this request is one of
    /// the share shed until the delay comes down.
    #[error(
        "Service Unavailable: this node is overloaded (work waits {delay_ms} ms for its CPU, more than the {max_ms} ms of setting limits.max_queue_delay_ms); retry later"
    )]
    Delay {
        /// The delay measured last, ms.
        delay_ms: u64,
        /// The limit, ms.
        max_ms: u64,
    },
}

impl Refusal {
    /// The `kind` label of `haven_admission_refused_total`.
    fn kind(&self) -> &'static str {
        match self {
            Refusal::Node(_) => "node",
            Refusal::Session(_) => "session",
            Refusal::Delay { .. } => "delay",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        if let Some(m) = haven_telemetry::get() {
            m.admission_refused
                .get_or_create(&haven_telemetry::KindLabel {
                    kind: self.kind().into(),
                })
                .inc();
        }
        let status = match self {
            Refusal::Node(_) | Refusal::Delay { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Session(_) => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut r = super::refusal(status, -32000, &self.to_string());
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn places_per_node_and_per_session_queue_and_free() {
        let limits = Arc::new(AdmissionLimits::default());
        limits.max_requests.store(2, Ordering::Relaxed);
        limits.max_queued.store(1, Ordering::Relaxed);
        limits.max_requests_per_session.store(1, Ordering::Relaxed);
        let a = Admission::new(limits.clone());
        let one = a.admit(Some("s1")).await.unwrap();
        // The session's second request is refused at once.
        assert_eq!(a.admit(Some("s1")).await.err(), Some(Refusal::Session(1)));
        let two = a.admit(None).await.unwrap();
        // The node is full: one request waits in the queue and gets the first freed place.
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(Some("s2")).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(a.load(), (2, 1));
        // The queue is full: refused at once.
        assert_eq!(a.admit(None).await.err(), Some(Refusal::Node(2)));
        drop(one);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        // A queued request whose wait runs out is refused.
        let three = a.admit(None).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(a.admit(None).await.err(), Some(Refusal::Node(2)));
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
        assert_eq!(a.load(), (2, 0));
        drop((two, three));
        assert_eq!(a.load(), (0, 0));
        assert!(a.counts().per_session.is_empty());
    }

    /// The shedder under a controlled clock: one late sample sheds nothing, a delay that
    /// stands for a second sheds a share growing by a tenth per late sample up to 95 %, and
    /// timely samples bring it back down by a twentieth each.
    #[test]
    fn shedding_starts_after_a_standing_delay_and_ramps_both_ways() {
        let max = Duration::from_millis(250);
        let late = Duration::from_millis(400);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = DelayShedder::default();
        // Late samples for less than a second: a burst, not a standing queue.
        assert_eq!(s.observe(at(0), late, max), 0);
        assert_eq!(s.observe(at(500), late, max), 0);
        // One timely sample resets the clock.
        assert_eq!(s.observe(at(900), Duration::from_millis(10), max), 0);
        assert_eq!(s.observe(at(1400), late, max), 0);
        assert_eq!(s.observe(at(2000), late, max), 0);
        // Still late a second after the first late sample: shedding starts and grows.
        assert_eq!(s.observe(at(2400), late, max), 100);
        assert_eq!(s.observe(at(2900), late, max), 200);
        let mut share = 0;
        for i in 0..20 {
            share = s.observe(at(3000 + i * 500), late, max);
        }
        assert_eq!(share, MAX_SHED_PERMILLE);
        // A delay exactly at the limit is timely.
        assert_eq!(s.observe(at(20_000), max, max), MAX_SHED_PERMILLE - 50);
        for i in 0..30 {
            share = s.observe(at(20_100 + i * 100), Duration::ZERO, max);
        }
        assert_eq!(share, 0);
        // Late again: a whole second before shedding again.
        assert_eq!(s.observe(at(30_000), late, max), 0);
        assert_eq!(s.observe(at(31_000), late, max), 100);
        // Limit 0 turns shedding off at once.
        assert_eq!(s.observe(at(31_100), late, Duration::ZERO), 0);
        assert_eq!(s.observe(at(33_000), late, Duration::ZERO), 0);
    }

    /// The shed requests are exactly the share, picked by a counter; they are refused with
    /// 503, `Retry-After` and the setting's name, and take no place.
    #[tokio::test]
    async fn the_share_shed_for_delay_is_refused_at_once() {
        let a = Admission::new(Arc::default());
        a.record_delay(Duration::from_millis(730), 300);
        let mut shed = 0;
        for _ in 0..1000 {
            match a.shed() {
                Ok(()) => drop(a.admit(Some("s")).await.unwrap()),
                Err(r) => {
                    assert_eq!(
                        r,
                        Refusal::Delay {
                            delay_ms: 730,
                            max_ms: DEFAULT_MAX_QUEUE_DELAY_MS
                        }
                    );
                    shed += 1;
                }
            }
        }
        assert_eq!(shed, 300);
        assert_eq!(a.load(), (0, 0));
        let refusal = Refusal::Delay {
            delay_ms: 730,
            max_ms: 250,
        };
        let message = refusal.to_string();
        let r = refusal.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert!(message.contains("limits.max_queue_delay_ms"), "{message}");
        // Nothing is shed once the share is back at zero.
        a.record_delay(Duration::from_millis(5), 0);
        for _ in 0..100 {
            assert_eq!(a.shed(), Ok(()));
        }
        assert_eq!(a.delay(), (Duration::from_millis(5), 0));
    }

    /// The probe measures the wait of a runtime that is busy: with its only worker held by a
    /// task (blocked on a channel until released), the probe's wait covers the hold; a
    /// runtime that has shut down ends the probe.
    #[test]
    fn the_probe_measures_the_queue_wait_and_ends_with_the_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        // The only worker is held until the probe's task is queued behind it.
        rt.spawn(async move {
            held_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        });
        held_rx.recv().unwrap();
        // The probe's task cannot run while the worker is held, so its wait covers at least
        // the time from its handing to the release (a lower bound by construction).
        let (handed, wait) = hand_probe(rt.handle());
        while handed.elapsed() < Duration::from_millis(50) {
            std::thread::yield_now();
        }
        assert!(wait.try_recv().is_err(), "the probe ran past a held worker");
        release_tx.send(()).unwrap();
        let wait = wait.recv().unwrap();
        assert!(wait >= Duration::from_millis(50), "{wait:?}");
        // Once the runtime is gone, the probe says so instead of waiting forever.
        let handle = rt.handle().clone();
        drop(rt);
        assert_eq!(queue_wait(&handle), None);
    }

    /// The probe's second step waits behind the tasks already queued on its worker, as a
    /// connection woken by I/O does; a task that was just woken or spawned would otherwise
    /// run first (the LIFO slot).
    #[test]
    fn the_probe_waits_behind_queued_tasks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let order = rt.block_on(async {
            tokio::spawn(async {
                let order = Arc::new(Mutex::new(Vec::new()));
                let mut tasks = Vec::new();
                for name in ["a", "b", "c"] {
                    let order = order.clone();
                    tasks.push(tokio::spawn(async move {
                        order.lock().unwrap().push(name);
                    }));
                }
                BackOfTheQueue::default().await;
                order.lock().unwrap().push("probe");
                for t in tasks {
                    t.await.unwrap();
                }
                Arc::try_unwrap(order).unwrap().into_inner().unwrap()
            })
            .await
            .unwrap()
        });
        assert_eq!(order.last(), Some(&"probe"), "{order:?}");
        assert_eq!(order.len(), 4);
    }
}
