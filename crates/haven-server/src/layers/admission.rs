//! Admission control: a node serves at most `limits.max_requests` `/mcp` requests at once
//! (an open response stream counts until it ends), and one session at most
//! `limits.max_requests_per_session`. A request over the node's limit waits in a bounded
//! queue for a short while; when the queue is full or the wait runs out it is answered 503,
//! and a session over its own limit 429 — both at once, with `Retry-After: 1`, so that
//! overload never turns into unbounded memory or latency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
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
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_requests: AtomicUsize::new(4096),
            max_queued: AtomicUsize::new(1024),
            queue_wait_ms: AtomicU64::new(1000),
            max_requests_per_session: AtomicUsize::new(64),
        }
    }
}

/// The admission state of one node: what runs, what waits.
#[derive(Debug, Default)]
pub struct Admission {
    /// The limits in force.
    pub limits: Arc<AdmissionLimits>,
    counts: Mutex<Counts>,
    freed: tokio::sync::Notify,
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
    async fn admit(self: &Arc<Self>, session: Option<&str>) -> Result<Place, Refusal> {
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

/// A request's place; freed when its response (stream) ends.
struct Place {
    admission: Arc<Admission>,
    session: Option<String>,
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
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = match self {
            Refusal::Node(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Session(_) => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut r = super::refusal(status, -32000, &self.to_string());
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

/// The middleware: admits the request or refuses it at once; the place is held until the
/// response body (an SSE stream included) ends.
pub async fn enforce(
    State(admission): State<Arc<Admission>>,
    req: Request,
    next: Next,
) -> Response {
    let session = req
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let place = match admission.admit(session.as_deref()).await {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    let response = next.run(req).await;
    // The place goes with the body: when the stream ends or the client leaves.
    response.map(|body| {
        Body::new(body.map_err(move |e| {
            let _held = &place;
            e
        }))
    })
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
}
