//! Multi-region benchmarks on loopback with real processes: two regions, each one nats-server
//! (JetStream in its own domain) and one Haven node, joined by a leafnode through a link
//! that the benchmark cuts and heals (`haven_testkit::Link`), and HAProxy as the global load
//! balancer (`/regionz` picks the active region).
//!
//! In order: replication lag under a steady write load (a probe note written in A, the time
//! until B serves it, against the write's own latency in A as the reference); a planned
//! switchover A → B (time until the load balancer answers from B, and the writes made in A
//! before it that B lacks: the RPO); convergence after a split with writes on both sides
//! (time from the heal until both regions' state digests are equal); and a region loss (every
//! process of the active region killed: time until a client's session works again through
//! the load balancer, and the acknowledged writes B lacks).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use haven_bench::{haven_serve, median, wait_ready};
use haven_testkit::{Link, NatsCluster, Process, Proxy, free_port};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Haven multi-region benchmarks: lag, switchover, convergence, region loss")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// Probe writes for the lag measurement.
    #[arg(long, default_value_t = 300)]
    probes: usize,
    /// Background writes per second in region A during the lag measurement.
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// Seconds the regions are split (with writes on both sides).
    #[arg(long, default_value_t = 30)]
    split_secs: u64,
    /// Only measure the bootstrap of a cold region from a backup of this many records
    /// (written straight into region A's stream, then shipped by A's node).
    #[arg(long)]
    bootstrap_records: Option<u64>,
    /// Only measure automatic failover of the active role: three regions joined through a
    /// leafnode hub, region checks every 1 s (threshold 3), this many losses of the active
    /// region (each restarted afterwards and made active again).
    #[arg(long)]
    three_region_losses: Option<usize>,
    /// Only measure what waiting for a majority of regions adds to the end of a streamed
    /// call: this many legacy `sleep` calls of 1 s, alternately on a node of three regions
    /// (its final answer waits until two regions hold it) and of two regions (no region
    /// lease: it does not wait).
    #[arg(long)]
    final_latency: Option<usize>,
}

struct Node {
    _proc: Process,
    port: u16,
    data: PathBuf,
}

fn start_node(
    haven: &Path,
    nats: &NatsCluster,
    dir: &Path,
    region: &str,
    peer: &str,
    port: u16,
) -> anyhow::Result<Node> {
    let data = dir.join(region);
    let child = haven_serve(haven, port, &data)
        .args([
            "--store",
            &nats.url(0),
            "--store-replicas",
            "1",
            "--region",
            region,
        ])
        .args([
            "--peer-regions",
            peer,
            "--node-id",
            &format!("{region}-node"),
        ])
        .args(["--region-check-interval", "1s"])
        .arg("--secrets-key-file")
        .arg(dir.join("secrets.key"))
        .spawn()
        .context("starting haven")?;
    Ok(Node {
        _proc: Process(child),
        port,
        data,
    })
}

async fn call(
    client: &reqwest::Client,
    port: u16,
    id: u64,
    name: &str,
    args: Value,
) -> anyhow::Result<Value> {
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":name,"arguments":args,"_meta":{
        "io.modelcontextprotocol/protocolVersion":"2026-07-28",
        "io.modelcontextprotocol/clientCapabilities":{},
        "io.modelcontextprotocol/clientInfo":{"name":"region-bench","version":"1"}}}});
    let r = client
        .post(format!("http://127.0.0.1:{port}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", name)
        .body(body.to_string())
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    if r.status() != 200 {
        bail!("HTTP {}", r.status());
    }
    Ok(r.json().await?)
}

async fn put(
    client: &reqwest::Client,
    port: u16,
    id: u64,
    name: &str,
    text: &str,
) -> anyhow::Result<()> {
    let v = call(
        client,
        port,
        id,
        "notes_put",
        json!({"name": name, "text": text}),
    )
    .await?;
    if v.get("result").is_none() || v["result"]["isError"] == true {
        bail!("notes_put failed: {v}");
    }
    Ok(())
}

async fn get(client: &reqwest::Client, port: u16, id: u64, name: &str) -> Option<String> {
    let v = call(client, port, id, "notes_get", json!({"name": name}))
        .await
        .ok()?;
    if v["result"]["isError"] == true {
        return None;
    }
    v["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_owned)
}

async fn admin(
    client: &reqwest::Client,
    n: &Node,
    method: reqwest::Method,
    path: &str,
) -> anyhow::Result<Value> {
    admin_at(client, n.port, &n.data, method, path).await
}

/// An admin call to the node on `port` whose data directory (with its token) is `data`.
async fn admin_at(
    client: &reqwest::Client,
    port: u16,
    data: &Path,
    method: reqwest::Method,
    path: &str,
) -> anyhow::Result<Value> {
    let token = std::fs::read_to_string(data.join("admin.token"))?;
    let r = client
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(token.trim())
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if !status.is_success() {
        bail!("{path}: {status} {v}");
    }
    Ok(v)
}

async fn digest(client: &reqwest::Client, n: &Node) -> Option<String> {
    admin(
        client,
        n,
        reqwest::Method::GET,
        "/admin/v1/regions?digest=true",
    )
    .await
    .ok()
    .and_then(|v| v["digest"]["sha256"].as_str().map(str::to_owned))
}

async fn lb_region(client: &reqwest::Client, port: u16) -> Option<String> {
    let r = client
        .get(format!("http://127.0.0.1:{port}/regionz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["region"].as_str().map(str::to_owned)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let haven = cli.haven_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("haven")
    });
    if let Some(n) = cli.bootstrap_records {
        return bootstrap(&haven, n).await;
    }
    if let Some(n) = cli.final_latency {
        return final_latency(&haven, n).await;
    }
    if let Some(n) = cli.three_region_losses {
        return three_regions(&haven, n).await;
    }
    let dir = tempfile::tempdir()?;
    let made = std::process::Command::new(&haven)
        .args(["secrets", "new-key", "--key-file"])
        .arg(dir.path().join("secrets.key"))
        .status()?;
    if !made.success() {
        bail!("haven secrets new-key failed");
    }
    let mut nats_a = NatsCluster::start_region("A", &[]).await;
    let link = Link::start(nats_a.leaf_port.expect("a region has a leafnode port")).await;
    let nats_b = NatsCluster::start_region("B", &[link.port]).await;
    let [pa, pb] = haven_testkit::free_ports(2)[..] else {
        unreachable!("two ports were asked for")
    };
    let mut a = Some(start_node(&haven, &nats_a, dir.path(), "A", "B", pa)?);
    let b = start_node(&haven, &nats_b, dir.path(), "B", "A", pb)?;
    wait_ready(pa, "node A").await?;
    wait_ready(pb, "node B").await?;
    let client = reqwest::Client::new();
    let mut id = 0u64;

    // 1. Replication lag under a steady write load in A.
    let background = {
        let client = client.clone();
        let rate = cli.rate;
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            loop {
                tick.tick().await;
                i += 1;
                let _ = put(
                    &client,
                    pa,
                    1_000_000 + i,
                    &format!("load-{}", i % 500),
                    "x",
                )
                .await;
            }
        })
    };
    let (mut lags, mut acks) = (Vec::new(), Vec::new());
    for i in 0..cli.probes {
        id += 1;
        let sent = Instant::now();
        put(&client, pa, id, &format!("probe-{i}"), "p").await?;
        let acked = Instant::now();
        loop {
            id += 1;
            if get(&client, pb, id, &format!("probe-{i}")).await.is_some() {
                break;
            }
            if acked.elapsed() > Duration::from_secs(30) {
                bail!("probe {i} never reached B");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lags.push(acked.elapsed().as_secs_f64() * 1000.0);
        acks.push((acked - sent).as_secs_f64() * 1000.0);
    }
    background.abort();
    println!(
        "replication lag A→B over {} probes with {} background writes/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (the write's own latency in A: p50 {:.1} ms, p99 {:.1} ms; lag/write p50 ratio {:.2})",
        cli.probes,
        cli.rate,
        median(&lags),
        percentile(&lags, 0.99),
        percentile(&lags, 1.0),
        median(&acks),
        percentile(&acks, 0.99),
        median(&lags) / median(&acks)
    );

    // 2. Planned switchover A → B behind the global load balancer.
    let nodes = [pa, pb];
    let lb = Proxy::start_global(&nodes, &nodes).await;
    let a_node = a.as_ref().expect("running");
    admin(
        &client,
        a_node,
        reqwest::Method::POST,
        "/admin/v1/regions/promote",
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streak = 0;
    while streak < 10 {
        streak = if lb_region(&client, lb.port).await.as_deref() == Some("A") {
            streak + 1
        } else {
            0
        };
        if Instant::now() > deadline {
            bail!("the load balancer never preferred A");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..50 {
        id += 1;
        put(&client, pa, id, &format!("before-switch-{i}"), "s").await?;
    }
    let started = Instant::now();
    admin(
        &client,
        a_node,
        reqwest::Method::POST,
        "/admin/v1/regions/demote",
    )
    .await?;
    loop {
        match admin(
            &client,
            &b,
            reqwest::Method::POST,
            "/admin/v1/regions/promote",
        )
        .await
        {
            Ok(_) => break,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e),
        }
    }
    let promoted = started.elapsed();
    while lb_region(&client, lb.port).await.as_deref() != Some("B") {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the load balancer never moved to B");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let switched = started.elapsed();
    let mut missing = 0;
    for i in 0..50 {
        id += 1;
        if get(&client, pb, id, &format!("before-switch-{i}"))
            .await
            .is_none()
        {
            missing += 1;
        }
    }
    println!(
        "planned switchover A → B: B promoted (caught up) {:.2} s after the demotion, load balancer on B after {:.2} s; writes made in A before the switchover missing in B: {missing} of 50",
        promoted.as_secs_f64(),
        switched.as_secs_f64()
    );
    // And back, so that A is active for the loss below.
    admin(
        &client,
        &b,
        reqwest::Method::POST,
        "/admin/v1/regions/demote",
    )
    .await?;
    let back = Instant::now();
    while admin(
        &client,
        a_node,
        reqwest::Method::POST,
        "/admin/v1/regions/promote",
    )
    .await
    .is_err()
    {
        if back.elapsed() > Duration::from_secs(30) {
            bail!("A could not be promoted back");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. A split with writes on both sides, then the heal.
    link.cut();
    let cut = Instant::now();
    let mut i = 0;
    while cut.elapsed() < Duration::from_secs(cli.split_secs) {
        id += 4;
        put(&client, pa, id, &format!("split-a-{i}"), "a").await?;
        put(&client, pb, id + 1, &format!("split-b-{i}"), "b").await?;
        put(
            &client,
            pa,
            id + 2,
            &format!("split-same-{}", i % 10),
            &format!("a{i}"),
        )
        .await?;
        put(
            &client,
            pb,
            id + 3,
            &format!("split-same-{}", i % 10),
            &format!("b{i}"),
        )
        .await?;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    link.heal();
    let healed = Instant::now();
    loop {
        let (da, db) = (digest(&client, a_node).await, digest(&client, &b).await);
        if da.is_some() && da == db {
            break;
        }
        if healed.elapsed() > Duration::from_secs(120) {
            bail!("the regions did not converge within 120 s of the heal");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "split of {} s with {} writes on each side ({} to shared keys): equal state digests {:.2} s after the heal",
        cli.split_secs,
        2 * i,
        i,
        healed.elapsed().as_secs_f64()
    );

    // 4. Region A lost behind the load balancer.
    let mut streak = 0;
    while streak < 10 {
        streak = if lb_region(&client, lb.port).await.as_deref() == Some("A") {
            streak + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut acked = Vec::new();
    let writer_until = Instant::now() + Duration::from_secs(3);
    let mut k = 0;
    while Instant::now() < writer_until {
        id += 1;
        if put(&client, lb.port, id, &format!("loss-{k}"), "l")
            .await
            .is_ok()
        {
            acked.push((k, Instant::now()));
        }
        k += 1;
    }
    drop(a.take());
    nats_a.kill9(0);
    let killed = Instant::now();
    loop {
        id += 1;
        if put(&client, lb.port, id, "after-loss", "x").await.is_ok() {
            break;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the load balancer never served from B");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = killed.elapsed();
    let mut lost = Vec::new();
    for (k, at) in &acked {
        id += 1;
        if get(&client, pb, id, &format!("loss-{k}")).await.is_none() {
            lost.push(killed.duration_since(*at).as_secs_f64() * 1000.0);
        }
    }
    let window = lost.iter().copied().fold(0.0, f64::max);
    println!(
        "region A lost (nats-server and node killed): a write through the load balancer succeeds on B {:.2} s later (health checks every 500 ms, down after 2); acknowledged writes of the last 3 s missing in B: {} of {} (the oldest acknowledged {:.0} ms before the kill)",
        failover.as_secs_f64(),
        lost.len(),
        acked.len(),
        window
    );
    Ok(())
}

/// A cold region bootstrapped from a backup of `n` records: the records are written into
/// region A's stream in batches of 500, A's node ships a snapshot, then `haven region
/// bootstrap` builds region C from it; reports each phase's time.
async fn bootstrap(haven: &Path, n: u64) -> anyhow::Result<()> {
    use haven_state::{Batch, HybridClock, NatsConfig, NatsStore, Origin, Store};
    use std::sync::Arc;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("backup.key");
    let made = std::process::Command::new(haven)
        .args(["backup", "keygen", "--out"])
        .arg(&key)
        .status()?;
    if !made.success() {
        bail!("haven backup keygen failed");
    }
    let keys = dir.path().join("secrets.key");
    std::process::Command::new(haven)
        .args(["secrets", "new-key", "--key-file"])
        .arg(&keys)
        .status()?;
    let nats_a = NatsCluster::start_region("A", &[]).await;
    let started = Instant::now();
    {
        let store = NatsStore::open(
            &NatsConfig {
                servers: vec![nats_a.url(0)],
                region: "A".into(),
                replicas: 1,
                tls: Default::default(),
            },
            Origin::new("A", "loader"),
            Arc::new(HybridClock::default()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let value = vec![b'x'; 100];
        let mut i = 0u64;
        while i < n {
            let mut batch = Batch::new();
            for _ in 0..500.min(n - i) {
                batch = batch.put("notes", &format!("record-{i:09}"), value.clone());
                i += 1;
            }
            store
                .commit(batch)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let loaded = started.elapsed();
    let backups = dir.path().join("backups");
    let port = free_port();
    let child = haven_serve(haven, port, &dir.path().join("A"))
        .args([
            "--store",
            &nats_a.url(0),
            "--store-replicas",
            "1",
            "--region",
            "A",
        ])
        .args(["--peer-regions", "C", "--node-id", "A-node"])
        .arg("--secrets-key-file")
        .arg(&keys)
        .arg("--backup-url")
        .arg(&backups)
        .arg("--backup-key-file")
        .arg(&key)
        .args(["--backup-interval", "1h"])
        .spawn()?;
    let _a = Process(child);
    wait_ready(port, "node A").await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .build()?;
    let shipping = Instant::now();
    admin_at(
        &client,
        port,
        &dir.path().join("A"),
        reqwest::Method::POST,
        "/admin/v1/backup/now?snapshot=true",
    )
    .await?;
    let shipped = shipping.elapsed();
    let nats_c = NatsCluster::start_region("C", &[]).await;
    let booting = Instant::now();
    let out = std::process::Command::new(haven)
        .args(["region", "bootstrap", "--backup-url"])
        .arg(&backups)
        .arg("--backup-key-file")
        .arg(&key)
        .args([
            "--store",
            &nats_c.url(0),
            "--region",
            "C",
            "--store-replicas",
            "1",
        ])
        .output()?;
    let booted = booting.elapsed();
    if !out.status.success() {
        bail!("bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    println!(
        "cold region from a backup of {n} records: loading region A {:.1} s, shipping A's snapshot {:.1} s, haven region bootstrap {:.1} s ({:.0} records/s)",
        loaded.as_secs_f64(),
        shipped.as_secs_f64(),
        booted.as_secs_f64(),
        n as f64 / booted.as_secs_f64()
    );
    Ok(())
}

/// Automatic failover of the active role among three regions (see `Cli::three_region_losses`):
/// per loss, the time from the kill of the active region's processes until (a) a write
/// through the load balancer succeeds (served by a standby), (b) a surviving region holds the
/// roles record naming a new active region (detection and decision), and (c) the load
/// balancer's `/regionz` answers from the new active region ten times in a row, and (d) a
/// surviving region has taken over the lost region's claimable running work (its takeover
/// record is done: silence, freezes by a majority, the wait for the lost region's lease).
async fn three_regions(haven: &Path, losses: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::process::Command::new(haven)
        .args(["secrets", "new-key", "--key-file"])
        .arg(dir.path().join("secrets.key"))
        .status()?;
    let hub = NatsCluster::start_hub().await;
    let leaf = [hub.leaf_port.expect("a hub has a leafnode port")];
    let names = ["A", "B", "C"];
    let mut nats = Vec::new();
    for n in names {
        nats.push(NatsCluster::start_region(n, &leaf).await);
    }
    let ports = haven_testkit::free_ports(names.len());
    let peers = |i: usize| -> String {
        names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut nodes: Vec<Option<Node>> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        nodes.push(Some(start_node(
            haven,
            &nats[i],
            dir.path(),
            n,
            &peers(i),
            ports[i],
        )?));
    }
    for p in &ports {
        wait_ready(*p, "a node").await?;
    }
    let client = reqwest::Client::new();
    let lb = Proxy::start_global(&ports, &ports).await;
    let (mut writes, mut decided, mut preferred) = (Vec::new(), Vec::new(), Vec::new());
    let mut taken = Vec::new();
    let mut active = 0usize;
    admin(
        &client,
        nodes[0].as_ref().expect("up"),
        reqwest::Method::POST,
        "/admin/v1/regions/promote",
    )
    .await?;
    let mut id = 0u64;
    for round in 0..losses {
        // Wait until the load balancer settles on the active region.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut streak = 0;
        while streak < 10 {
            streak = if lb_region(&client, lb.port).await.as_deref() == Some(names[active]) {
                streak + 1
            } else {
                0
            };
            if Instant::now() > deadline {
                bail!("the load balancer never preferred {}", names[active]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let survivor = (active + 1) % 3;
        let before = takeover_round(
            &client,
            nodes[survivor].as_ref().expect("up"),
            names[active],
        )
        .await?;
        nodes[active] = None;
        nats[active].kill9(0);
        let killed = Instant::now();
        let mut t_write = None;
        let mut t_roles = None;
        let mut t_pref = None;
        let mut streak = 0;
        while t_pref.is_none() {
            if killed.elapsed() > Duration::from_secs(120) {
                bail!("round {round}: no failover within 120 s");
            }
            id += 1;
            if t_write.is_none() && put(&client, lb.port, id, "probe", "x").await.is_ok() {
                t_write = Some(killed.elapsed());
            }
            if t_roles.is_none() {
                let v = admin(
                    &client,
                    nodes[survivor].as_ref().expect("up"),
                    reqwest::Method::GET,
                    "/admin/v1/regions",
                )
                .await?;
                if v["roles"]["active"]
                    .as_str()
                    .is_some_and(|a| a != names[active])
                {
                    t_roles = Some(killed.elapsed());
                }
            }
            if t_roles.is_some() {
                let now = lb_region(&client, lb.port).await;
                streak = if now.as_deref().is_some_and(|r| r != names[active]) {
                    streak + 1
                } else {
                    0
                };
                if streak == 10 {
                    t_pref = Some(killed.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t_taken = loop {
            if killed.elapsed() > Duration::from_secs(120) {
                bail!("round {round}: no takeover of the lost region's work within 120 s");
            }
            let mut done = false;
            for n in nodes.iter().flatten() {
                done |= takeover_round(&client, n, names[active]).await? > before;
            }
            if done {
                break killed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        taken.push(t_taken.as_secs_f64());
        writes.push(t_write.unwrap_or_default().as_secs_f64());
        decided.push(t_roles.unwrap_or_default().as_secs_f64());
        preferred.push(t_pref.unwrap_or_default().as_secs_f64());
        eprintln!(
            "loss {round} of {}: write served {:.2} s, new active decided {:.2} s, load balancer on it {:.2} s, running work taken over {:.2} s",
            names[active], writes[round], decided[round], preferred[round], taken[round]
        );
        // The lost region returns (as a standby); the new active region is the next one.
        nats[active].restart(0).await;
        nodes[active] = Some(start_node(
            haven,
            &nats[active],
            dir.path(),
            names[active],
            &peers(active),
            ports[active],
        )?);
        wait_ready(ports[active], "a restarted node").await?;
        let v = admin(
            &client,
            nodes[survivor].as_ref().expect("up"),
            reqwest::Method::GET,
            "/admin/v1/regions",
        )
        .await?;
        active = names
            .iter()
            .position(|n| v["roles"]["active"] == *n)
            .context("no active region after the failover")?;
    }
    println!(
        "automatic failover among three regions over {losses} losses of the active region (region checks 1 s x 3, HAProxy checks 500 ms x 2): a write through the load balancer succeeds after median {:.2} s (max {:.2}); the surviving majority names a new active region after median {:.2} s (max {:.2}); the load balancer prefers it after median {:.2} s (max {:.2}); a survivor has taken over the lost region's running work after median {:.2} s (max {:.2})",
        median(&writes),
        percentile(&writes, 1.0),
        median(&decided),
        percentile(&decided, 1.0),
        median(&preferred),
        percentile(&preferred, 1.0),
        median(&taken),
        percentile(&taken, 1.0)
    );
    Ok(())
}

/// The highest round of a completed takeover of `source`'s work held by node `n` (0: none).
async fn takeover_round(client: &reqwest::Client, n: &Node, source: &str) -> anyhow::Result<u64> {
    let v = admin(client, n, reqwest::Method::GET, "/admin/v1/regions").await?;
    Ok(v["takeover"]["takeovers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["source"] == source && t["stage"] == "done")
        .filter_map(|t| t["round"].as_u64())
        .max()
        .unwrap_or(0))
}

/// Opens a legacy session on the node on `port`; its id.
async fn legacy_session(client: &reqwest::Client, port: u16) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{port}/mcp");
    let r = client
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"region-bench","version":"1"}}}).to_string())
        .send()
        .await?;
    let session = r
        .headers()
        .get("mcp-session-id")
        .context("no session id")?
        .to_str()?
        .to_owned();
    let _ = r.bytes().await?;
    client
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .body(json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string())
        .send()
        .await?;
    Ok(session)
}

/// A legacy `sleep` call of one second on its SSE stream; the time until the stream ended
/// (after its final answer).
async fn streamed_sleep(
    client: &reqwest::Client,
    port: u16,
    session: &str,
    id: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let r = client
        .post(format!("http://127.0.0.1:{port}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", session)
        .body(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"sleep","arguments":{"seconds":1},"_meta":{"progressToken":format!("p{id}")}}}).to_string())
        .send()
        .await?;
    let body = String::from_utf8(r.bytes().await?.to_vec())?;
    if !body.contains("Slept 1 second") {
        bail!("no final result: {body}");
    }
    Ok(started.elapsed())
}

/// See `Cli::final_latency`.
async fn final_latency(haven: &Path, n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::process::Command::new(haven)
        .args(["secrets", "new-key", "--key-file"])
        .arg(dir.path().join("secrets.key"))
        .status()?;
    // Three regions through a hub, and two regions joined directly.
    let hub = NatsCluster::start_hub().await;
    let leaf = [hub.leaf_port.expect("a hub has a leafnode port")];
    let three = ["A", "B", "C"];
    let mut nats = Vec::new();
    for r in three {
        nats.push(NatsCluster::start_region(r, &leaf).await);
    }
    let x = NatsCluster::start_region("X", &[]).await;
    let y = NatsCluster::start_region("Y", &[x.leaf_port.expect("a leafnode port")]).await;
    let mut nodes = Vec::new();
    for (i, r) in three.iter().enumerate() {
        let peers: Vec<&str> = three.iter().filter(|p| *p != r).copied().collect();
        nodes.push(start_node(
            haven,
            &nats[i],
            dir.path(),
            r,
            &peers.join(","),
            free_port(),
        )?);
    }
    nodes.push(start_node(haven, &x, dir.path(), "X", "Y", free_port())?);
    nodes.push(start_node(haven, &y, dir.path(), "Y", "X", free_port())?);
    for n in &nodes {
        wait_ready(n.port, "a node").await?;
    }
    let client = reqwest::Client::new();
    // Until node A holds its region lease (its calls are then claimable).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin(
            &client,
            &nodes[0],
            reqwest::Method::GET,
            "/admin/v1/regions",
        )
        .await?;
        if v["takeover"]["lease_holds"] == true {
            break;
        }
        if Instant::now() > deadline {
            bail!("node A never held its region lease: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (pa, px) = (nodes[0].port, nodes[3].port);
    let sa = legacy_session(&client, pa).await?;
    let sx = legacy_session(&client, px).await?;
    let (mut leased, mut plain) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Alternate which goes first, so that drift on the machine hits both alike.
        let id = i as u64 + 1;
        if i % 2 == 0 {
            leased.push(streamed_sleep(&client, pa, &sa, id).await?.as_secs_f64() - 1.0);
            plain.push(streamed_sleep(&client, px, &sx, id).await?.as_secs_f64() - 1.0);
        } else {
            plain.push(streamed_sleep(&client, px, &sx, id).await?.as_secs_f64() - 1.0);
            leased.push(streamed_sleep(&client, pa, &sa, id).await?.as_secs_f64() - 1.0);
        }
    }
    let (ml, mp) = (median(&leased), median(&plain));
    println!(
        "a streamed 1 s call, time beyond its 1 s ({n} calls each): three regions (final waits for a majority) median {:.0} ms, p90 {:.0} ms; two regions (no wait) median {:.0} ms, p90 {:.0} ms; difference of medians {:.0} ms",
        ml * 1000.0,
        percentile(&leased, 0.9) * 1000.0,
        mp * 1000.0,
        percentile(&plain, 0.9) * 1000.0,
        (ml - mp) * 1000.0
    );
    drop(nodes);
    Ok(())
}
