//! Test and benchmark support: the processes Haven's tests run against, on loopback only, each
//! stopped when its handle is dropped, and the small helpers every test and benchmark needs
//! around them (free ports, raw HTTP probes, bounded waits, a store in a temporary directory,
//! an upstream MCP server whose error pages echo credentials: [`LeakyUpstream`]).
//! The binaries come from the tools folder that `scripts/install-tools` fills
//! (`HAVEN_TOOLS_DIR`, default `.tools/` of the repository); HAProxy comes from the system.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_state::{HybridClock, Origin, RedbStore};

pub mod idp;
pub mod leaky_upstream;
pub use leaky_upstream::LeakyUpstream;

/// The tools folder.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("HAVEN_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools"))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports on loopback, outside the system's ephemeral range, so that no
/// connection takes one before the process it is meant for binds it (see
/// [`haven_drill::ports`]).
pub fn free_ports(n: usize) -> Vec<u16> {
    haven_drill::ports::free_ports(n).expect("free loopback ports")
}

/// A redb store in `dir`, of node `n1` in region `r1`, on the system clock.
pub fn redb_store(dir: &Path) -> Arc<RedbStore> {
    Arc::new(
        RedbStore::open(
            dir,
            Origin::new("r1", "n1"),
            Arc::new(HybridClock::default()),
        )
        .unwrap(),
    )
}

/// A child process, killed (and reaped) when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request on loopback (`Connection: close`) with `headers` and an optional
/// body; the status and the body of the answer, if one arrives within `within`.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    within: Duration,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    req.push_str(body.unwrap_or_default());
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_owned()))
}

/// The status of a GET of `path` on loopback, if an answer arrives within `within`.
pub async fn http_status_within(port: u16, path: &str, within: Duration) -> Option<u16> {
    http_request(port, "GET", path, &[], None, within)
        .await
        .map(|(status, _)| status)
}

/// A minimal HTTP GET on loopback; the status code, if any answer within 5 s (longer than
/// Haven's own 2 s bound on a readiness check, so that a slow "not ready" is still read).
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    http_status_within(port, path, Duration::from_secs(5)).await
}

/// Polls `ready` every `every` until it holds; false if it still does not after `within`.
pub async fn wait_until<F, Fut>(within: Duration, every: Duration, mut ready: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if ready().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until a GET of `path` answers 200 (polled with `http_status`); false after `within`.
pub async fn wait_for_status(port: u16, path: &str, within: Duration) -> bool {
    wait_until(within, Duration::from_millis(100), || async {
        http_status(port, path).await == Some(200)
    })
    .await
}

/// Waits until something accepts connections on `port`; false after `within`.
pub async fn wait_listening(port: u16, within: Duration) -> bool {
    wait_until(within, Duration::from_millis(100), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
}

/// One nats-server of a [`NatsCluster`].
pub struct NatsServer {
    /// The process, while it runs.
    pub child: Option<Child>,
    /// Its configuration file.
    pub conf: PathBuf,
    /// Client port.
    pub client_port: u16,
    /// Monitoring port (`/healthz`).
    pub http_port: u16,
    /// `server_name`.
    pub name: String,
}

/// Three nats-servers in one JetStream cluster (`sync_interval: always`), on loopback.
pub struct NatsCluster {
    /// The servers, by index.
    pub servers: Vec<NatsServer>,
    /// The leafnode listener of a region's server ([`NatsCluster::start_region`]).
    pub leaf_port: Option<u16>,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl NatsCluster {
    /// Starts the cluster with the tools folder's nats-server and waits until every server
    /// has JetStream ready.
    pub async fn start() -> NatsCluster {
        NatsCluster::start_in(&tools_dir()).await
    }

    /// Like [`NatsCluster::start`] with the nats-server of another tools folder. A start
    /// that fails (a port taken by another process between its choice and the server's bind)
    /// is tried again on new ports, up to three times.
    pub async fn start_in(tools: &Path) -> NatsCluster {
        NatsCluster::start_configured(tools, NatsCluster::configure).await
    }

    /// One nats-server as a region of its own: JetStream in domain `region` (the region's
    /// name, as Haven's multi-region mode expects), a leafnode listener, and leafnode
    /// remotes to the listeners on `remotes` (other regions, or proxies in front of them).
    pub async fn start_region(region: &str, remotes: &[u16]) -> NatsCluster {
        NatsCluster::start_configured(&tools_dir(), |bin| {
            NatsCluster::configure_region(bin, region, remotes)
        })
        .await
    }

    async fn start_configured(
        tools: &Path,
        configure: impl Fn(PathBuf) -> NatsCluster,
    ) -> NatsCluster {
        let bin = tools.join("venv/bin/nats-server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/install-tools (the README's test command does)",
            bin.display()
        );
        let mut failures = Vec::new();
        for _ in 0..3 {
            let mut c = configure(bin.clone());
            let n = c.servers.len();
            for i in 0..n {
                c.spawn(i);
            }
            let mut ok = true;
            for i in 0..n {
                if let Err(e) = c.healthy(i).await {
                    failures.push(e);
                    ok = false;
                    break;
                }
            }
            if ok {
                return c;
            }
        }
        panic!("the NATS servers did not start:\n{}", failures.join("\n"));
    }

    /// One nats-server without JetStream that regions join by leafnodes (their
    /// `start_region` remotes name its `leaf_port`): the interconnect of three or more
    /// regions, since leafnode connections must not form a cycle.
    pub async fn start_hub() -> NatsCluster {
        NatsCluster::start_configured(&tools_dir(), |bin| {
            let dir = tempfile::tempdir().unwrap();
            let ports = free_ports(3);
            let conf = dir.path().join("nats0.conf");
            std::fs::write(
                &conf,
                format!(
                    "server_name: hub0\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\nleafnodes {{ listen: 127.0.0.1:{}, no_advertise: true }}\n",
                    ports[0], ports[1], ports[2]
                ),
            )
            .unwrap();
            NatsCluster {
                servers: vec![NatsServer {
                    child: None,
                    conf,
                    client_port: ports[0],
                    http_port: ports[1],
                    name: "hub0".into(),
                }],
                leaf_port: Some(ports[2]),
                bin,
                _dir: dir,
            }
        })
        .await
    }

    /// One nats-server with JetStream (one replica) whose client port requires TLS: `tls` is
    /// the body of its `tls { }` block, e.g. `cert_file: "…", key_file: "…", ca_file: "…",
    /// verify: true` (client certificates required). Its monitoring port stays plain HTTP.
    pub async fn start_tls(tls: &str) -> NatsCluster {
        let tls = tls.to_owned();
        NatsCluster::start_configured(&tools_dir(), move |bin| {
            let dir = tempfile::tempdir().unwrap();
            let ports = free_ports(2);
            let conf = dir.path().join("nats0.conf");
            std::fs::write(
                &conf,
                format!(
                    "server_name: tls0\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\", sync_interval: always }}\ntls {{ {tls} }}\n",
                    ports[0],
                    ports[1],
                    dir.path().join("js0").display(),
                ),
            )
            .unwrap();
            NatsCluster {
                servers: vec![NatsServer {
                    child: None,
                    conf,
                    client_port: ports[0],
                    http_port: ports[1],
                    name: "tls0".into(),
                }],
                leaf_port: None,
                bin,
                _dir: dir,
            }
        })
        .await
    }

    /// The configuration of one server of region `region` (nothing started).
    fn configure_region(bin: PathBuf, region: &str, remotes: &[u16]) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(3);
        let remotes: Vec<String> = remotes
            .iter()
            .map(|p| format!("{{ url: \"nats-leaf://127.0.0.1:{p}\" }}"))
            .collect();
        let conf = dir.path().join("nats0.conf");
        std::fs::write(
            &conf,
            format!(
                "server_name: {region}-nats0\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\", sync_interval: always, domain: {region} }}\nleafnodes {{ listen: 127.0.0.1:{}, no_advertise: true, reconnect: 1, remotes: [{}] }}\n",
                ports[0],
                ports[1],
                dir.path().join("js0").display(),
                ports[2],
                remotes.join(", ")
            ),
        )
        .unwrap();
        NatsCluster {
            servers: vec![NatsServer {
                child: None,
                conf,
                client_port: ports[0],
                http_port: ports[1],
                name: format!("{region}-nats0"),
            }],
            leaf_port: Some(ports[2]),
            bin,
            _dir: dir,
        }
    }

    /// Writes the configuration of three servers on new ports (nothing started).
    fn configure(bin: PathBuf) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(9);
        let (client, rest) = ports.split_at(3);
        let (cluster, http) = rest.split_at(3);
        let mut servers = Vec::new();
        for i in 0..3 {
            let routes: Vec<String> = cluster
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            let conf = dir.path().join(format!("nats{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: nats{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\", sync_interval: always }}\ncluster {{ name: haven-region, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    client[i],
                    http[i],
                    dir.path().join(format!("js{i}")).display(),
                    cluster[i],
                    routes.join(", ")
                ),
            )
            .unwrap();
            servers.push(NatsServer {
                child: None,
                conf,
                client_port: client[i],
                http_port: http[i],
                name: format!("nats{i}"),
            });
        }
        NatsCluster {
            servers,
            leaf_port: None,
            bin,
            _dir: dir,
        }
    }

    fn spawn(&mut self, i: usize) {
        let s = &mut self.servers[i];
        s.child = Some(
            Command::new(&self.bin)
                .arg("-c")
                .arg(&s.conf)
                .stdout(Stdio::null())
                .stderr(log_file(&s.conf.with_extension("log")))
                .spawn()
                .expect("starting nats-server"),
        );
    }

    /// Waits until server `i` reports JetStream healthy.
    pub async fn wait_healthy(&mut self, i: usize) {
        if let Err(e) = self.healthy(i).await {
            panic!("{e}");
        }
    }

    /// Waits until server `i` reports JetStream healthy; fails at once if it exited, with
    /// the end of its log.
    async fn healthy(&mut self, i: usize) -> Result<(), String> {
        // A restarted server recovers its JetStream state first; on a loaded machine that
        // can take a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let port = self.servers[i].http_port;
        loop {
            if http_status(port, "/healthz?js-enabled-only=true").await == Some(200) {
                return Ok(());
            }
            let exited = self.servers[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(self.servers[i].conf.with_extension("log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                return Err(format!(
                    "nats-server {i} did not become healthy ({}); its log ends with:\n{}",
                    exited.map_or("still running after 120 s".to_owned(), |s| format!(
                        "exited: {s}"
                    )),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9` of server `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts server `i` again on its data.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// The URL of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    /// The `--store` value naming every server.
    pub fn store_url(&self) -> String {
        (0..self.servers.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the server called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }
}

/// HAProxy in front of Haven nodes: health checks on `/readyz` every 200 ms (a node is down
/// after one failed check, up after two good ones; a check may take 2 s), a request goes to
/// another node when its node refuses the connection or closes it without an answer.
pub struct Proxy {
    child: Child,
    /// The port clients use.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Starts HAProxy in front of the nodes on `backends` and waits until it answers
    /// `/readyz` (so at least one node must be up).
    pub async fn start(backends: &[u16]) -> Proxy {
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!("    server n{i} 127.0.0.1:{p} check inter 200ms fall 1 rise 2\n")
            })
            .collect();
        Proxy::launch(|port| {
            format!(
                "frontend mcp\n    bind 127.0.0.1:{port}\n    default_backend haven\n\nbackend haven\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n{servers}"
            )
        })
        .await
    }

    /// Starts HAProxy with the shared `global` and `defaults` sections and the frontends and
    /// backends that `proxies(port)` writes for the port clients use; waits until it answers
    /// `/readyz`.
    async fn launch(proxies: impl FnOnce(u16) -> String) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n    maxconn 4000\n\ndefaults\n    mode http\n    timeout connect 200ms\n    timeout check 2s\n    timeout client 120s\n    timeout server 120s\n    retries 3\n    option redispatch\n    option http-server-close\n    retry-on conn-failure empty-response\n\n{}",
                proxies(port)
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&conf)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting haproxy (installed by scripts/install-tools)");
        let p = Proxy {
            child,
            port,
            _dir: dir,
        };
        let up = wait_for_status(port, "/readyz", Duration::from_secs(20)).await;
        assert!(up, "haproxy did not come up");
        p
    }

    /// HAProxy as a global load balancer in front of regions: the nodes on `primaries` (the
    /// region meant to be active) are checked on `/regionz` (200 only while their region is
    /// the active one and caught up), the nodes on `backups` (a standby region) on
    /// `/readyz` and used only while no primary passes (two backends: `active`, chosen while
    /// it has a server up, else `standby`). Checks every 500 ms; a node is down after 2
    /// failed checks, up after 2 good ones.
    pub async fn start_global(primaries: &[u16], backups: &[u16]) -> Proxy {
        let line = |name: String, p: &u16| {
            format!("    server {name} 127.0.0.1:{p} check inter 500ms fall 2 rise 2\n")
        };
        let active: String = primaries
            .iter()
            .enumerate()
            .map(|(i, p)| line(format!("p{i}"), p))
            .collect();
        let standby: String = backups
            .iter()
            .enumerate()
            .map(|(i, p)| line(format!("b{i}"), p))
            .collect();
        Proxy::launch(|port| {
            format!(
                "frontend mcp\n    bind 127.0.0.1:{port}\n    use_backend active if {{ nbsrv(active) gt 0 }}\n    default_backend standby\n\nbackend active\n    option httpchk GET /regionz\n    http-check expect status 200\n{active}\nbackend standby\n    option httpchk GET /readyz\n    http-check expect status 200\n{standby}"
            )
        })
        .await
    }

    /// The MCP endpoint through the proxy.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

/// A TCP link of the tests' own between two processes (e.g. a leafnode connection between
/// regions) that can be cut and healed: cut closes every connection through it at once and
/// refuses new ones; heal lets new ones through again.
pub struct Link {
    /// The port to connect to instead of the target's.
    pub port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.task.abort();
    }
}

impl Link {
    /// A link to `target` on loopback.
    pub async fn start(target: u16) -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *watch.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Link { port, cut, task }
    }

    /// Closes every connection through the link and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets new connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

/// A log file that every start of a process appends to.
fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("opening a log file")
}

/// One server-sent event with a data line (a priming event's data is empty).
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The event's id (`<stream>-<index>` for Haven's streams).
    pub id: Option<String>,
    /// The data lines, joined by newlines.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// The index part of a `<stream>-<index>` id.
    pub fn index(&self) -> Option<u64> {
        let position = self.id.as_deref()?.rsplit_once('-')?.1;
        // `<stream>-<index>` or `<stream>-<index>.<timestamp>`.
        position.split('.').next()?.parse().ok()
    }
}

/// Reads the server-sent events of a response body (events with a data line, priming events
/// included).
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    /// Reads `response`'s body.
    pub fn new(response: reqwest::Response) -> SseReader {
        use futures::StreamExt;
        SseReader {
            body: response.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event, or `None` at the end of the body (or on a transport error).
    pub async fn next(&mut self) -> Option<SseEvent> {
        use futures::StreamExt;
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let (mut id, mut data, mut has_data) = (None, Vec::new(), false);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        has_data = true;
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if has_data {
                    return Some(SseEvent {
                        id,
                        data: data.join("\n"),
                    });
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                _ => return None,
            }
        }
    }
}
