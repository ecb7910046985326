//! Connection limits on a real listener, under tokio's paused clock (a timeout's elapse is
//! virtual and exact): a client that sends its headers slowly and an idle keep-alive
//! connection are closed after the header read timeout, a body that does not arrive within
//! its deadline is answered 408, and connections over the node's cap or over one address's
//! cap are answered 503 with `Retry-After` and closed while the others are served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use haven_server::ConnLimits;
use haven_server::layers::body_limit::{BodyLimit, take};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

struct Server {
    addr: SocketAddr,
    limits: Arc<ConnLimits>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
        let limits = Arc::new(ConnLimits::default());
        let body = BodyLimit {
            bytes: Arc::new(AtomicUsize::new(1 << 20)),
            limits: limits.clone(),
        };
        let router = Router::new()
            .route(
                "/echo",
                post(move |req: axum::extract::Request| async move {
                    let (parts, b) = req.into_parts();
                    match take(&body, &parts.headers, b).await {
                        Ok(b) => b.len().to_string().into_response(),
                        Err(refusal) => refusal.into_response(),
                    }
                }),
            )
            .route("/", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = haven_server::HttpConfig {
            limits: limits.clone(),
            ..Default::default()
        };
        let task = tokio::spawn(async move {
            haven_server::serve_with_grace(
                listener,
                router,
                &config,
                async {
                    let _ = stopped.await;
                },
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        });
        Server {
            addr,
            limits,
            stop: Some(stop),
            task,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// A connection from another loopback address.
    async fn connect_from(&self, ip: &str) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(self.addr).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n";

/// Reads one answer (head and a `content-length` body) and returns it as text.
async fn answer(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed mid-answer: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the server closes `s`; returns how long that took.
async fn closed(s: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_or_idle_connection_is_closed_after_the_header_read_timeout() {
    let server = Server::start().await;
    server
        .limits
        .header_read_timeout_ms
        .store(10_000, Ordering::Relaxed);

    // Half a request's head, and nothing more.
    let mut slow = server.connect().await;
    slow.write_all(b"GET / HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let took = closed(&mut slow).await;
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "{took:?}"
    );

    // A connection that sent nothing at all.
    let mut silent = server.connect().await;
    let took = closed(&mut silent).await;
    assert!(took >= Duration::from_secs(10), "{took:?}");

    // A keep-alive connection stays open for the next request within the timeout, and is
    // closed once idle for it.
    let mut kept = server.connect().await;
    kept.write_all(GET).await.unwrap();
    assert!(answer(&mut kept).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    kept.write_all(GET).await.unwrap();
    assert!(answer(&mut kept).await.starts_with("HTTP/1.1 200"));
    let took = closed(&mut kept).await;
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "{took:?}"
    );

    // A change applies to the next connection.
    server
        .limits
        .header_read_timeout_ms
        .store(2_000, Ordering::Relaxed);
    let mut next = server.connect().await;
    let took = closed(&mut next).await;
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    let server = Server::start().await;
    server
        .limits
        .body_read_timeout_ms
        .store(5_000, Ordering::Relaxed);
    let mut s = server.connect().await;
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let a = answer(&mut s).await;
    let took = started.elapsed();
    assert!(a.starts_with("HTTP/1.1 408"), "{a}");
    assert!(
        a.contains("the request body did not arrive within 5000 ms"),
        "{a}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // A whole body is read as before.
    let mut s = server.connect().await;
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: localhost\r\ncontent-length: 3\r\n\r\nabc")
        .await
        .unwrap();
    let a = answer(&mut s).await;
    assert!(
        a.starts_with("HTTP/1.1 200") && a.ends_with("\r\n\r\n3"),
        "{a}"
    );
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn connections_over_the_caps_are_answered_503_and_the_others_served() {
    let server = Server::start().await;
    server.limits.max_connections.store(2, Ordering::Relaxed);
    let mut first = server.connect().await;
    first.write_all(GET).await.unwrap();
    assert!(answer(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut second = server.connect().await;
    second.write_all(GET).await.unwrap();
    assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));

    // A third is refused, with when to retry, and closed.
    let mut third = server.connect().await;
    third.write_all(GET).await.unwrap();
    let a = answer(&mut third).await;
    assert!(a.starts_with("HTTP/1.1 503"), "{a}");
    assert!(a.contains("retry-after: 1"), "{a}");
    assert!(a.contains("maximum of 2 open connections"), "{a}");
    closed(&mut third).await;
    // The two admitted connections are still served.
    first.write_all(GET).await.unwrap();
    assert!(answer(&mut first).await.starts_with("HTTP/1.1 200"));

    // One closes: its place is free again (once the server has seen it close).
    drop(second);
    let mut served = false;
    for _ in 0..100 {
        let mut s = server.connect().await;
        s.write_all(GET).await.unwrap();
        if answer(&mut s).await.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "the closed connection's place was never freed");
    drop(first);

    // Per client address: one address at its cap is refused, another is served.
    server.limits.max_connections.store(100, Ordering::Relaxed);
    server
        .limits
        .max_connections_per_ip
        .store(1, Ordering::Relaxed);
    let mut held = server.connect_from("127.0.0.2").await;
    held.write_all(GET).await.unwrap();
    assert!(answer(&mut held).await.starts_with("HTTP/1.1 200"));
    let mut over = server.connect_from("127.0.0.2").await;
    over.write_all(GET).await.unwrap();
    let a = answer(&mut over).await;
    assert!(a.starts_with("HTTP/1.1 503"), "{a}");
    assert!(a.contains("this client address"), "{a}");
    let mut other = server.connect_from("127.0.0.3").await;
    other.write_all(GET).await.unwrap();
    assert!(answer(&mut other).await.starts_with("HTTP/1.1 200"));
    drop((held, other));
    server.stop().await;
}
