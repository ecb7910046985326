//! The `overload` drill's own load: the deployment's capacity measured with closed-loop
//! clients, then twice that offered open-loop (requests sent at a fixed rate whatever the
//! answers) through the load balancer, every answer's status, `Retry-After` and latency
//! recorded, and every node's resident memory sampled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::load::stateless_call;

/// Requests the open-loop sender keeps in flight at most; beyond that it counts a request
/// as shed by the client (its own limit, not the deployment's answer).
const MAX_IN_FLIGHT: usize = 4096;

/// What the overload did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OverloadFigures {
    /// Calls per second the deployment completed with 32 closed-loop clients.
    pub capacity: f64,
    /// Calls per second offered during the overload (twice the capacity).
    pub offered_rate: f64,
    /// Seconds the overload lasted.
    pub seconds: f64,
    /// Requests sent.
    pub sent: u64,
    /// Answered with a result.
    pub admitted: u64,
    /// Refused with 503 or 429.
    pub refused: u64,
    /// Of those, with a `Retry-After` header.
    pub refused_with_retry_after: u64,
    /// Failed otherwise (transport, timeout, another status).
    pub failed: u64,
    /// Not sent: the sender's own in-flight limit was reached.
    pub shed_by_client: u64,
    /// Admitted requests' latency, seconds: median and 99th percentile.
    pub admitted_p50: f64,
    /// 99th percentile.
    pub admitted_p99: f64,
    /// Refused requests' latency, seconds: median and 99th percentile.
    pub refused_p50: f64,
    /// 99th percentile.
    pub refused_p99: f64,
    /// The largest resident memory of any node before the overload, bytes.
    pub memory_before: f64,
    /// The largest resident memory of any node during it, bytes.
    pub memory_during: f64,
    /// The largest scheduling delay any node reported during it (how long work waited for
    /// the node's CPU), seconds.
    pub node_delay_max: f64,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The largest `process_resident_memory_bytes` of `nodes`' `/metrics`.
pub async fn max_memory(http: &reqwest::Client, nodes: &[String], token: &str) -> f64 {
    max_metrics(http, nodes, token).await.0
}

/// The largest `process_resident_memory_bytes` and `haven_scheduling_delay_seconds` of
/// `nodes`' `/metrics` (0 for a node that does not answer or lacks the series).
async fn max_metrics(http: &reqwest::Client, nodes: &[String], token: &str) -> (f64, f64) {
    let (mut memory, mut delay) = (0.0f64, 0.0f64);
    for n in nodes {
        let Ok(r) = http
            .get(format!("{n}/metrics"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        for line in text.lines() {
            let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if line.starts_with("process_resident_memory_bytes")
                && let Some(v) = value()
            {
                memory = memory.max(v);
            } else if line.starts_with("haven_scheduling_delay_seconds")
                && let Some(v) = value()
            {
                delay = delay.max(v);
            }
        }
    }
    (memory, delay)
}

/// Closed-loop `echo` calls by 32 clients for `window`: completed calls per second.
async fn capacity(base: &str, window: Duration) -> f64 {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client with no TLS settings always builds");
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for c in 0..32u64 {
        let (http, base, done) = (http.clone(), base.to_owned(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < end {
                n += 1;
                let id = c * 1_000_000 + n;
                if stateless_call(&http, &base, id, "echo", json!({"text": "capacity"}))
                    .await
                    .is_ok()
                {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(std::sync::atomic::Ordering::Relaxed) as f64 / window.as_secs_f64()
}

#[derive(Default)]
struct Tally {
    admitted: Vec<f64>,
    refused: Vec<f64>,
    refused_with_retry_after: u64,
    failed: u64,
}

/// Measures the capacity, then offers twice it for `phase`; `on_start` runs when the
/// overload begins.
pub async fn overload(
    base: &str,
    nodes: &[String],
    token: &str,
    phase: Duration,
    on_start: impl FnOnce(f64),
) -> OverloadFigures {
    let probe = reqwest::Client::new();
    let memory_before = max_memory(&probe, nodes, token).await;
    let capacity = capacity(base, Duration::from_secs(5)).await;
    let offered = (capacity * 2.0).max(1.0);
    on_start(offered);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build()
        .expect("a client with no TLS settings always builds");
    let tally = Arc::new(Mutex::new(Tally::default()));
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let during = Arc::new(Mutex::new((memory_before, 0.0f64)));
    let sampler = {
        let (nodes, token, during) = (nodes.to_vec(), token.to_owned(), during.clone());
        tokio::spawn(async move {
            let probe = reqwest::Client::new();
            loop {
                let (m, delay) = max_metrics(&probe, &nodes, &token).await;
                {
                    let mut d = during.lock().unwrap();
                    *d = (d.0.max(m), d.1.max(delay));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / offered);
    let (mut sent, mut shed) = (0u64, 0u64);
    let mut tasks = tokio::task::JoinSet::new();
    while start.elapsed() < phase {
        // Open loop: the n-th request is due at n × interval, whatever came back.
        let due = start + interval.mul_f64(sent as f64 + shed as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shed += 1;
            continue;
        };
        sent += 1;
        let (http, base, tally) = (http.clone(), base.to_owned(), tally.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let r = http
                .post(format!("{base}/mcp"))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "echo")
                .body(
                    json!({"jsonrpc":"2.0","id":sent,"method":"tools/call","params":{
                        "name":"echo","arguments":{"text":"overload"},
                        "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                            "io.modelcontextprotocol/clientCapabilities":{},
                            "io.modelcontextprotocol/clientInfo":{"name":"haven-drill","version":"1"}}}})
                    .to_string(),
                )
                .send()
                .await;
            let took = t.elapsed().as_secs_f64();
            let mut tally = tally.lock().unwrap();
            match r {
                Ok(r) if r.status() == 200 => tally.admitted.push(took),
                Ok(r) if r.status() == 503 || r.status() == 429 => {
                    tally.refused.push(took);
                    if r.headers().contains_key("retry-after") {
                        tally.refused_with_retry_after += 1;
                    }
                }
                _ => tally.failed += 1,
            }
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let seconds = start.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    sampler.abort();
    let (memory_during, node_delay_max) = *during.lock().unwrap();
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    OverloadFigures {
        capacity,
        offered_rate: offered,
        seconds,
        sent,
        admitted: t.admitted.len() as u64,
        refused: t.refused.len() as u64,
        refused_with_retry_after: t.refused_with_retry_after,
        failed: t.failed,
        shed_by_client: shed,
        admitted_p50: percentile(&mut t.admitted, 0.5),
        admitted_p99: percentile(&mut t.admitted, 0.99),
        refused_p50: percentile(&mut t.refused, 0.5),
        refused_p99: percentile(&mut t.refused, 0.99),
        memory_before,
        memory_during,
        node_delay_max,
    }
}

impl OverloadFigures {
    /// What missed the drill's bounds: refusals without `Retry-After` or slower than 1 s at
    /// the 99th percentile, admitted calls slower than 1 s at the 99th percentile, nothing
    /// refused while the sender had to shed, memory
    /// above three times its level before plus 256 MiB.
    pub fn findings(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.refused > self.refused_with_retry_after {
            f.push(format!(
                "{} of {} refused requests had no Retry-After",
                self.refused - self.refused_with_retry_after,
                self.refused
            ));
        }
        if self.refused_p99 > 1.0 {
            f.push(format!(
                "the excess was not refused quickly: refusals took {:.2} s at the 99th percentile (bound 1 s)",
                self.refused_p99
            ));
        }
        if self.admitted_p99 > 1.0 {
            f.push(format!(
                "admitted calls took {:.2} s at the 99th percentile (bound 1 s)",
                self.admitted_p99
            ));
        }
        if self.refused == 0 && self.shed_by_client > 0 {
            // Where the excess waited: in the nodes (work waiting for their CPU, which
            // `limits.max_queue_delay_ms` sheds) or before them (the load balancer, or the
            // sender itself when it shares the deployment's machine).
            let place = if self.node_delay_max > 0.1 {
                format!(
                    "in the nodes (work waited up to {:.0} ms for their CPU)",
                    self.node_delay_max * 1000.0
                )
            } else {
                format!(
                    "before the nodes, in the load balancer or the sender (the nodes' CPU delay stayed at most {:.0} ms)",
                    self.node_delay_max * 1000.0
                )
            };
            f.push(format!(
                "nothing was refused at twice the capacity: the excess waited {place}, until the sender's own limit of {MAX_IN_FLIGHT} requests in flight shed {} of them",
                self.shed_by_client
            ));
        }
        if self.memory_during > self.memory_before * 3.0 + 256.0 * 1024.0 * 1024.0 {
            f.push(format!(
                "memory grew from {:.0} MiB to {:.0} MiB under the overload",
                self.memory_before / 1048576.0,
                self.memory_during / 1048576.0
            ));
        }
        if self.admitted == 0 {
            f.push("no request was admitted during the overload".into());
        }
        f
    }
}
