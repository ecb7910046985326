//! Test and benchmark support: the processes Haven's tests run against, on loopback only, each
//! stopped when its handle is dropped. The binaries come from the tools folder that
//! `scripts/install-tools` fills (`HAVEN_TOOLS_DIR`, default `.tools/` of the repository);
//! HAProxy comes from the system.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tools folder.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("HAVEN_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools"))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP GET on loopback; the status code, if any answer within 5 s (longer than
/// Haven's own 2 s bound on a readiness check, so that a slow "not ready" is still read).
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1)?.parse().ok()
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

    /// Like [`NatsCluster::start`] with the nats-server of another tools folder.
    pub async fn start_in(tools: &Path) -> NatsCluster {
        let bin = tools.join("venv/bin/nats-server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/install-tools (the README's test command does)",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let http: Vec<u16> = (0..3).map(|_| free_port()).collect();
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
        let mut c = NatsCluster {
            servers,
            bin,
            _dir: dir,
        };
        for i in 0..3 {
            c.spawn(i);
        }
        for i in 0..3 {
            c.wait_healthy(i).await;
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let s = &mut self.servers[i];
        s.child = Some(
            Command::new(&self.bin)
                .arg("-c")
                .arg(&s.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting nats-server"),
        );
    }

    /// Waits until server `i` reports JetStream healthy.
    pub async fn wait_healthy(&self, i: usize) {
        // A restarted server recovers its JetStream state first; on a loaded machine that
        // can take a while.
        let deadline = Instant::now() + Duration::from_secs(120);
        while http_status(self.servers[i].http_port, "/healthz?js-enabled-only=true").await
            != Some(200)
        {
            assert!(
                Instant::now() < deadline,
                "nats-server {i} did not become healthy"
            );
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
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!("    server n{i} 127.0.0.1:{p} check inter 200ms fall 1 rise 2\n")
            })
            .collect();
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n    maxconn 4000\n\ndefaults\n    mode http\n    timeout connect 200ms\n    timeout check 2s\n    timeout client 120s\n    timeout server 120s\n    retries 3\n    option redispatch\n    option http-server-close\n    retry-on conn-failure empty-response\n\nfrontend mcp\n    bind 127.0.0.1:{port}\n    default_backend haven\n\nbackend haven\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n{servers}"
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_status(port, "/readyz").await != Some(200) {
            assert!(Instant::now() < deadline, "haproxy did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    /// The MCP endpoint through the proxy.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}
