//! Connections: the accept loop with its caps (open connections in all and per client
//! address), the header read timeout (which also closes idle keep-alive connections), the
//! bounds of a request head (bytes and header count: 431), and the graceful stop. Every
//! request carries its connection's peer address for the per-address rate limit. The limits are runtime settings (`http.*`, applied by the binary while
//! serving), read from shared values when a connection opens.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::http::{App, Mcp};

/// Connection limits, shared with whoever changes them at runtime. A change applies to
/// connections opened after it (and, for the body deadline, to the next request).
#[derive(Debug)]
pub struct ConnLimits {
    /// Longest wait for a request's headers, counted from the connection's opening or from
    /// the end of the previous answer on it: a slow client's connection, and an idle
    /// keep-alive connection, is closed after it. Milliseconds.
    pub header_read_timeout_ms: AtomicU64,
    /// Longest time to read a request's body (answered 408 after it). Milliseconds.
    pub body_read_timeout_ms: AtomicU64,
    /// Open connections a node keeps; one more is answered 503 and closed.
    pub max_connections: AtomicUsize,
    /// Open connections from one client address (0: no cap per address).
    pub max_connections_per_ip: AtomicUsize,
    /// Largest request head (request line and headers), bytes: hyper's read buffer, which a
    /// head must fit in (at least 8192). A larger head is answered 431 and the connection
    /// closed.
    pub max_header_bytes: AtomicUsize,
    /// Most header fields in one request; more are answered 431 and the connection closed.
    pub max_headers: AtomicUsize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout_ms: AtomicU64::new(10_000),
            body_read_timeout_ms: AtomicU64::new(30_000),
            max_connections: AtomicUsize::new(10_000),
            max_connections_per_ip: AtomicUsize::new(0),
            max_header_bytes: AtomicUsize::new(DEFAULT_MAX_HEADER_BYTES),
            max_headers: AtomicUsize::new(DEFAULT_MAX_HEADERS),
        }
    }
}

/// The default of [`ConnLimits::max_header_bytes`].
pub const DEFAULT_MAX_HEADER_BYTES: usize = 65_536;
/// The default of [`ConnLimits::max_headers`] (hyper's own, kept on the stack).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8192;

impl ConnLimits {
    /// The header read timeout in force.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms.load(Ordering::Relaxed).max(1))
    }

    /// The body read deadline in force.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms.load(Ordering::Relaxed).max(1))
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Full {
    /// The node holds `max_connections`.
    Node(usize),
    /// The client's address holds `max_connections_per_ip`.
    Address(usize),
}

/// The open connections, in all and per client address.
#[derive(Default)]
struct Tracker {
    counts: Mutex<Counts>,
    /// Notified when the last connection closes.
    none_open: tokio::sync::Notify,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; closing it (dropping the slot) frees its place.
struct Slot {
    tracker: Arc<Tracker>,
    ip: IpAddr,
}

impl Tracker {
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ConnLimits) -> Result<Slot, Full> {
        let max = limits.max_connections.load(Ordering::Relaxed);
        let per_ip = limits.max_connections_per_ip.load(Ordering::Relaxed);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= max {
            return Err(Full::Node(max));
        }
        let mine = c.per_ip.entry(ip).or_default();
        if per_ip > 0 && *mine >= per_ip {
            return Err(Full::Address(per_ip));
        }
        *mine += 1;
        c.total += 1;
        Ok(Slot {
            tracker: self.clone(),
            ip,
        })
    }

    fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .tracker
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        if c.total == 0 {
            self.tracker.none_open.notify_waiters();
        }
    }
}

/// What every connection is handed: `/mcp` straight to its handler when the app has one,
/// every other request through the router.
#[derive(Clone)]
struct Service {
    router: hyper_util::service::TowerToHyperService<Router>,
    mcp: Option<Mcp>,
}

/// [`Service`] for one connection: every request carries the connection's peer address
/// (`ConnectInfo<SocketAddr>`), which the per-address rate limit reads.
#[derive(Clone)]
struct WithPeer<S> {
    inner: S,
    peer: SocketAddr,
}

type Routed = <hyper_util::service::TowerToHyperService<Router> as hyper::service::Service<
    http::Request<hyper::body::Incoming>,
>>::Future;

type Answered = futures::future::Either<
    Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>,
    Routed,
>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for WithPeer<Service> {
    type Response = Response;
    type Error = Infallible;
    type Future = Answered;

    fn call(&self, mut req: http::Request<hyper::body::Incoming>) -> Answered {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        match &self.inner.mcp {
            // The future is made in its box (not moved there: it is several KiB).
            Some(mcp) if req.uri().path() == "/mcp" => {
                futures::future::Either::Left(Box::pin(mcp.clone().serve(req)))
            }
            _ => futures::future::Either::Right(self.inner.router.call(req)),
        }
    }
}

/// Refusals being written at once, at most: beyond it a refused connection is just closed.
const MAX_REFUSING: usize = 64;

/// Answers a refused connection 503 with `Retry-After` and closes it, within a second.
async fn refuse(mut stream: TcpStream, why: Full) {
    let text = match why {
        Full::Node(n) => format!("this node holds its maximum of {n} open connections"),
        Full::Address(n) => {
            format!("this client address holds its maximum of {n} open connections")
        }
    };
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":-32000,"message":"Service Unavailable: {text}; retry later"}}}}"#
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes, so that closing does not reset the
        // connection before the client read the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Serves one admitted connection (plain or TLS) until it ends or, once the node stops,
/// until its running request is answered.
async fn serve_connection<I>(
    io: I,
    http: hyper::server::conn::http1::Builder,
    service: WithPeer<Service>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = http.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = async { drop(stopping.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Serves `app` (a router, or [`crate::app`] with its direct `/mcp`) on `listener` within
/// `limits` until `shutdown` resolves, then lets open connections finish (bounded by
/// `grace`). HTTP/1.1 only, every connection with `TCP_NODELAY`.
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    limits: Arc<ConnLimits>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    serve_maybe_tls(listener, app, limits, None, shutdown, grace).await
}

/// [`serve`], over TLS when `tls` is given. The TLS handshake happens inside the connection
/// caps and must complete within the header read timeout (a client that opens a connection
/// and never finishes it is closed then); a connection refused at a cap is closed without an
/// answer (an HTTP answer could not be read before a handshake).
pub async fn serve_maybe_tls(
    listener: TcpListener,
    app: impl Into<App>,
    limits: Arc<ConnLimits>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    serve_until_settled(
        listener,
        app,
        limits,
        tls,
        shutdown,
        std::future::ready(()),
        grace,
    )
    .await
}

/// [`serve_maybe_tls`] whose drain also waits for `settled` (e.g. the node's running
/// requests to end): until then, and until the open connections closed (at most `grace`
/// after `shutdown`), the listener keeps answering, one request per new connection, so that
/// a load balancer's `/readyz` gets "503 draining" instead of a refused connection.
pub async fn serve_until_settled(
    listener: TcpListener,
    app: impl Into<App>,
    limits: Arc<ConnLimits>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    settled: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app: App = app.into();
    let service = Service {
        router: hyper_util::service::TowerToHyperService::new(app.router),
        mcp: app.mcp,
    };
    let tracker = Arc::new(Tracker::default());
    let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    // Connections accepted while draining are never told to stop early: they carry one
    // request each (no keep-alive), so that a health check gets its answer.
    let (_never, not_stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut settled = std::pin::pin!(settled);
    let mut is_settled = false;
    // Once `shutdown` resolves the node drains: open connections finish their running
    // request and close, and the listener keeps answering (`/readyz` says 503 draining)
    // until they all closed and `settled` resolved, or `grace` passed. Only then does it
    // stop accepting.
    let mut draining = false;
    let mut drain_deadline = tokio::time::Instant::now();
    loop {
        let drained = async {
            loop {
                let none = tracker.none_open.notified();
                if tracker.open() == 0 {
                    return;
                }
                none.await;
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match tracker.admit(peer.ip(), &limits) {
                    Ok(slot) => slot,
                    Err(why) => {
                        tracing::debug!(peer = %peer, ?why, "connection refused: at the cap");
                        if tls.is_none()
                            && let Ok(permit) = refusing.clone().try_acquire_owned()
                        {
                            tokio::spawn(async move {
                                refuse(stream, why).await;
                                drop(permit);
                            });
                        }
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "setting TCP_NODELAY failed");
                }
                let header_read_timeout = limits.header_read_timeout();
                let mut http = hyper::server::conn::http1::Builder::new();
                http.keep_alive(!draining)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .max_buf_size(
                        limits
                            .max_header_bytes
                            .load(Ordering::Relaxed)
                            .max(MIN_HEADER_BYTES),
                    );
                let max_headers = limits.max_headers.load(Ordering::Relaxed).max(1);
                if max_headers != DEFAULT_MAX_HEADERS {
                    // Another count than hyper's default moves the parser's header array to
                    // the heap, a small cost per request: only then is it set.
                    http.max_headers(max_headers);
                }
                let service = WithPeer {
                    inner: service.clone(),
                    peer,
                };
                let mut stopping = if draining {
                    not_stopping.clone()
                } else {
                    stopping.clone()
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let Some(acceptor) = tls else {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        serve_connection(io, http, service, stopping).await;
                        return;
                    };
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(header_read_timeout, acceptor.accept(stream)) => r,
                        () = async { drop(stopping.wait_for(|s| *s).await) } => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            serve_connection(io, http, service, stopping).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(
                            peer = %peer,
                            "TLS handshake not completed within the header read timeout: closed"
                        ),
                    }
                });
            }
            () = &mut shutdown, if !draining => {
                draining = true;
                drain_deadline = tokio::time::Instant::now() + grace;
                let _ = stop.send(true);
            }
            () = &mut settled, if draining && !is_settled => is_settled = true,
            () = drained, if draining && is_settled => break,
            () = tokio::time::sleep_until(drain_deadline), if draining => {
                tracing::info!("connections still open after the grace period are closed");
                break;
            }
        }
    }
    drop(listener);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_in_all_and_per_address_and_free_on_close() {
        let t = Arc::new(Tracker::default());
        let limits = ConnLimits::default();
        limits.max_connections.store(3, Ordering::Relaxed);
        limits.max_connections_per_ip.store(2, Ordering::Relaxed);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = t.admit(a, &limits).unwrap();
        let _a2 = t.admit(a, &limits).unwrap();
        assert_eq!(t.admit(a, &limits).err(), Some(Full::Address(2)));
        let _b1 = t.admit(b, &limits).unwrap();
        assert_eq!(t.admit(b, &limits).err(), Some(Full::Node(3)));
        drop(a1);
        assert_eq!(t.open(), 2);
        let _a3 = t.admit(a, &limits).unwrap();
        // No cap per address.
        limits.max_connections_per_ip.store(0, Ordering::Relaxed);
        limits.max_connections.store(10, Ordering::Relaxed);
        let more: Vec<Slot> = (0..5).map(|_| t.admit(a, &limits).unwrap()).collect();
        assert_eq!(t.open(), 8);
        drop(more);
        assert_eq!(t.open(), 3);
        assert_eq!(
            t.counts.lock().unwrap().per_ip.get(&a).copied(),
            Some(2),
            "per-address counts follow closes"
        );
    }
}
