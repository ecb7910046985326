//! A complete one-region deployment on this machine, for `haven drill run --local`: three
//! NATS servers in one JetStream cluster (`sync_interval: always`), Haven nodes on them
//! sharing one secrets key and one admin token, and HAProxy in front checking `/readyz`.
//! Every process is stopped when the deployment is dropped; its directory (configuration,
//! data and every process's log) is removed too unless it was asked to be kept.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::DrillError;
use crate::link::{Link, LinkState};

/// Requests HAProxy sends one node at once in a one-region deployment (the nodes' own
/// `limits.max_requests` here is 256 as well).
const LB_MAXCONN_PER_NODE: u32 = 64;

/// HAProxy's answer when it has no node to give a request to in time.
const LB_503: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32000,\"message\":\"Service Unavailable: no Haven node could take the request within 250 ms (load balancer queue); retry later\"}}\n";

/// Where a local deployment's nodes ship their continuous backup (one node of the region at
/// a time, every second).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupStore {
    /// No backup.
    Off,
    /// A directory of the deployment.
    Directory,
    /// An S3 bucket of a local object store: a `moto_server` (this binary) on loopback.
    Moto(PathBuf),
}

/// The bucket of a local object store.
const BUCKET: &str = "haven-drill";

/// What the local deployment runs.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The `haven` binary the nodes run (normally this very program).
    pub haven: PathBuf,
    /// The `nats-server` binary.
    pub nats_server: PathBuf,
    /// The `haproxy` binary.
    pub haproxy: PathBuf,
    /// How many Haven nodes (at least 2: a drill kills one).
    pub nodes: usize,
    /// The directory for configuration, data and logs; created, and removed afterwards
    /// unless `keep`.
    pub dir: PathBuf,
    /// Keep `dir` afterwards.
    pub keep: bool,
    /// Connect each node to the NATS servers, and the NATS servers to each other, through
    /// links of their own that faults can cut or slow ([`Local::set_node_links`],
    /// [`Local::set_nats_links`]).
    pub links: bool,
    /// Two regions instead of one: `A` and `B`, each one NATS server (JetStream in the
    /// region's domain) and one Haven node, B's leafnode connection to A through a link
    /// that faults cut ([`Local::set_region_link`]), HAProxy as a global load balancer
    /// (`/regionz` chooses the active region), A promoted to active at the start. `nodes` is
    /// ignored (one per region).
    pub two_regions: bool,
    /// Where the nodes ship their backup (one region only); the restore drills need one.
    pub backup: BackupStore,
    /// Put each NATS server's store on a file system of its own (a 1 GiB tmpfs mounted by
    /// this process, which needs root), so that a fault can fill it
    /// ([`Local::fill_disk`]); without the privilege the deployment starts without them.
    pub disks: bool,
}

struct NatsServer {
    name: String,
    region: String,
    conf: PathBuf,
    client_port: u16,
    http_port: u16,
    child: Option<Child>,
}

struct Node {
    name: String,
    region: String,
    port: u16,
    child: Option<Child>,
}

/// The running deployment.
pub struct Local {
    opts: LocalOptions,
    nats: Vec<NatsServer>,
    nodes: Vec<Node>,
    haproxy: Option<Child>,
    lb_port: u16,
    admin_token: String,
    /// `links[node][server]`, when the deployment has links.
    links: Vec<Vec<Link>>,
    /// `routes[from][to]`: the link NATS server `from` reaches server `to`'s cluster port
    /// through, when the deployment has links (none from a server to itself).
    routes: Vec<Vec<Option<Link>>>,
    /// A link that is always cut: what the NATS servers with route links advertise as their
    /// cluster address, so that no server learns another's real one from gossip and routes
    /// around a cut.
    nowhere: Option<Link>,
    /// B's leafnode link to A, with two regions.
    region_link: Option<Link>,
    /// The local object store, when backups go to one.
    moto: Option<Child>,
    /// The backup's URL and the environment that reaches it (`None`: no backup).
    backup: Option<(String, Vec<(String, String)>)>,
    /// Regions built from the backup so far (each restore makes a new one).
    restores: u32,
    /// The file systems mounted for the NATS servers' stores (`disks`), by server.
    mounts: Vec<PathBuf>,
}

impl Drop for Local {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            stop_child(&mut n.child);
        }
        stop_child(&mut self.haproxy);
        for s in &mut self.nats {
            stop_child(&mut s.child);
        }
        stop_child(&mut self.moto);
        for m in self.mounts.drain(..) {
            unmount(&m);
        }
        if !self.opts.keep {
            let _ = std::fs::remove_dir_all(&self.opts.dir);
        }
    }
}

fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Free loopback ports for the deployment's processes (see [`crate::ports`]).
fn free_ports(n: usize) -> Result<Vec<u16>, DrillError> {
    crate::ports::free_ports(n)
        .map_err(|e| DrillError::Deployment(format!("no free port on loopback: {e}")))
}

fn log_file(path: &Path) -> Result<std::fs::File, DrillError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| DrillError::Deployment(format!("opening {}: {e}", path.display())))
}

/// The last `n` lines of a log, for an error message.
fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The status of a GET on loopback, or `None` when nothing answers within 2 s.
pub(crate) async fn http_status(client: &reqwest::Client, url: &str) -> Option<u16> {
    let r = client
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

impl Local {
    /// Starts everything and waits until the load balancer answers `/readyz`.
    pub async fn start(opts: LocalOptions) -> Result<Local, DrillError> {
        if opts.nodes < 2 && !opts.two_regions {
            return Err(DrillError::Usage(
                "a local deployment needs at least 2 Haven nodes".into(),
            ));
        }
        for (what, bin) in [
            ("nats-server", &opts.nats_server),
            ("haproxy", &opts.haproxy),
            ("haven", &opts.haven),
        ] {
            if which(bin).is_none() {
                return Err(DrillError::Usage(format!(
                    "{what} not found at {} (pass its path with --{what}, or put it on PATH)",
                    bin.display()
                )));
            }
        }
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| DrillError::Deployment(format!("creating {}: {e}", opts.dir.display())))?;
        let token = format!(
            "drill-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let mut local = Local {
            nats: Vec::new(),
            nodes: Vec::new(),
            haproxy: None,
            lb_port: 0,
            admin_token: token,
            links: Vec::new(),
            routes: Vec::new(),
            nowhere: None,
            region_link: None,
            moto: None,
            backup: None,
            restores: 0,
            mounts: Vec::new(),
            opts,
        };
        if local.opts.two_regions {
            local.configure_regions().await?;
        } else {
            local.nats = local.configure_nats("drill", false).await?;
        }
        if local.opts.disks && !local.opts.two_regions {
            local.mount_disks();
        }
        for i in 0..local.nats.len() {
            local.spawn_nats(i)?;
        }
        for i in 0..local.nats.len() {
            local.wait_nats(i).await?;
        }
        let made = Command::new(&local.opts.haven)
            .args(["secrets", "new-key", "--key-file"])
            .arg(local.key_file())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| DrillError::Deployment(format!("running haven secrets new-key: {e}")))?;
        if !made.status.success() {
            return Err(DrillError::Deployment(format!(
                "haven secrets new-key failed: {}",
                String::from_utf8_lossy(&made.stderr)
            )));
        }
        if !local.opts.two_regions && local.opts.backup != BackupStore::Off {
            local.configure_backup().await?;
        }
        let regions: Vec<String> = if local.opts.two_regions {
            vec!["A".into(), "B".into()]
        } else {
            vec!["drill".into(); local.opts.nodes]
        };
        let ports = free_ports(regions.len())?;
        if local.opts.links {
            for _ in 0..regions.len() {
                let mut row = Vec::new();
                for s in &local.nats {
                    row.push(Link::start(s.client_port).await?);
                }
                local.links.push(row);
            }
        }
        local.nodes = ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| Node {
                name: if local.opts.two_regions {
                    format!("{}-node", regions[i])
                } else {
                    format!("node{i}")
                },
                region: regions[i].clone(),
                port,
                child: None,
            })
            .collect();
        for i in 0..local.nodes.len() {
            local.start_node(i).await?;
        }
        local.start_haproxy().await?;
        local.size_for_this_machine().await?;
        if local.opts.two_regions {
            local.promote(0, false).await?;
            local.wait_lb_region("A").await?;
        }
        Ok(local)
    }

    /// Two one-server regions, B's leafnode connection to A through a link (nothing started).
    async fn configure_regions(&mut self) -> Result<(), DrillError> {
        let ports = free_ports(6)?;
        let a_leaf = ports[2];
        let link = Link::start(a_leaf).await?;
        for (i, region) in ["A", "B"].into_iter().enumerate() {
            let (client, http, leaf) = (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
            let remotes = if region == "B" {
                format!("{{ url: \"nats-leaf://127.0.0.1:{}\" }}", link.port)
            } else {
                String::new()
            };
            let conf = self.opts.dir.join(format!("{region}-nats0.conf"));
            let text = format!(
                "server_name: {region}-nats0\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\njetstream {{ store_dir: \"{}\", sync_interval: always, domain: {region} }}\nleafnodes {{ listen: 127.0.0.1:{leaf}, no_advertise: true, reconnect: 1, remotes: [{remotes}] }}\n",
                self.opts.dir.join(format!("{region}-js0")).display(),
            );
            std::fs::write(&conf, text)
                .map_err(|e| DrillError::Deployment(format!("writing {}: {e}", conf.display())))?;
            self.nats.push(NatsServer {
                name: format!("{region}-nats0"),
                region: region.into(),
                conf,
                client_port: client,
                http_port: http,
                child: None,
            });
        }
        self.region_link = Some(link);
        Ok(())
    }

    /// `POST /admin/v1/regions/promote` on node `i` (forced: even while another region may be
    /// active and ahead).
    pub async fn promote(&self, i: usize, force: bool) -> Result<(), DrillError> {
        self.region_change(
            i,
            if force {
                "promote?force=true"
            } else {
                "promote"
            },
        )
        .await
    }

    /// `POST /admin/v1/regions/demote` on node `i`.
    pub async fn demote(&self, i: usize) -> Result<(), DrillError> {
        self.region_change(i, "demote").await
    }

    async fn region_change(&self, i: usize, what: &str) -> Result<(), DrillError> {
        let r = reqwest::Client::new()
            .post(format!("{}/admin/v1/regions/{what}", self.node_bases()[i]))
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| DrillError::Deployment(format!("regions/{what}: {e}")))?;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        tracing::info!(node = %self.nodes[i].name, %status, "regions/{what}: {body}");
        if !status.is_success() {
            return Err(DrillError::Deployment(format!(
                "regions/{what} on {}: {status}: {body}",
                self.nodes[i].name
            )));
        }
        Ok(())
    }

    /// Waits (at most 60 s) until the load balancer's `/regionz` answers from `region`.
    pub async fn wait_lb_region(&self, region: &str) -> Result<(), DrillError> {
        let client = reqwest::Client::new();
        let url = format!("{}/regionz", self.lb_base());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut in_a_row = 0;
        while in_a_row < 5 {
            if Instant::now() > deadline {
                return Err(DrillError::Deployment(format!(
                    "the load balancer did not settle on region {region} within 60 s"
                )));
            }
            let got = match client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(r) => r.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            };
            if got.as_ref().and_then(|v| v["region"].as_str()) == Some(region) {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Sets B's leafnode link to A (two regions): cut, healed or slowed.
    pub fn set_region_link(&self, state: LinkState) {
        if let Some(l) = &self.region_link {
            l.set(state);
        }
    }

    /// The nodes of `region`.
    pub fn nodes_of(&self, region: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].region == region)
            .collect()
    }

    /// The NATS servers of `region`.
    pub fn nats_of(&self, region: &str) -> Vec<usize> {
        (0..self.nats.len())
            .filter(|i| self.nats[*i].region == region)
            .collect()
    }

    /// Whether this is a two-region deployment.
    pub fn two_regions(&self) -> bool {
        self.opts.two_regions
    }

    /// Sizes the nodes' admission for a small shared machine (the defaults suit a node of its
    /// own): at most 256 requests served at once and 256 waiting per node, beyond which a
    /// request is answered 503 with `Retry-After` at once (what the overload drill shows).
    async fn size_for_this_machine(&self) -> Result<(), DrillError> {
        let client = reqwest::Client::new();
        let base = &self.node_bases()[0];
        for (key, value) in [
            ("limits.max_requests", 256),
            ("limits.max_queued_requests", 256),
        ] {
            let r = client
                .put(format!("{base}/admin/v1/config/{key}"))
                .bearer_auth(&self.admin_token)
                .header("content-type", "application/json")
                .body(format!("{{\"value\": {value}}}"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| DrillError::Deployment(format!("setting {key}: {e}")))?;
            if !r.status().is_success() {
                return Err(DrillError::Deployment(format!(
                    "setting {key}: {}",
                    r.status()
                )));
            }
        }
        Ok(())
    }

    fn key_file(&self) -> PathBuf {
        self.opts.dir.join("secrets.key")
    }

    /// Three NATS servers in one JetStream cluster for `region` (configured, not started);
    /// with `domain`, in the region's own JetStream domain (what a region built from backups
    /// needs: a region's name is its domain).
    /// The first region's servers of a deployment with links reach each other through route
    /// links ([`Local::set_nats_links`]); a region built later from backups does not.
    async fn configure_nats(
        &mut self,
        region: &str,
        domain: bool,
    ) -> Result<Vec<NatsServer>, DrillError> {
        let ports = free_ports(9)?;
        let (client, rest) = ports.split_at(3);
        let (cluster, http) = rest.split_at(3);
        let linked = self.opts.links && !domain;
        self.routes.clear();
        if linked {
            let nowhere = Link::start(cluster[0]).await?;
            nowhere.set(LinkState {
                cut: true,
                latency_ms: 0,
            });
            self.nowhere = Some(nowhere);
            for i in 0..3 {
                let mut row = Vec::new();
                for (j, port) in cluster.iter().enumerate() {
                    row.push(if i == j {
                        None
                    } else {
                        Some(Link::start(*port).await?)
                    });
                }
                self.routes.push(row);
            }
        }
        let advertise = match (&self.nowhere, linked) {
            (Some(l), true) => format!(", advertise: \"127.0.0.1:{}\"", l.port),
            _ => String::new(),
        };
        // The first region's servers keep their short names.
        let prefix = if domain {
            format!("{region}-")
        } else {
            String::new()
        };
        let domain = if domain {
            format!(", domain: {region}")
        } else {
            String::new()
        };
        let mut servers = Vec::new();
        for i in 0..3 {
            let routes: Vec<String> = cluster
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, p)| {
                    let p = match self.routes.get(i).and_then(|r| r[j].as_ref()) {
                        Some(link) => link.port,
                        None => *p,
                    };
                    format!("\"nats-route://127.0.0.1:{p}\"")
                })
                .collect();
            let name = format!("{prefix}nats{i}");
            let conf = self.opts.dir.join(format!("{name}.conf"));
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\", sync_interval: always{domain} }}\ncluster {{ name: haven-{region}, listen: 127.0.0.1:{}{advertise}, routes: [{}] }}\n",
                client[i],
                http[i],
                self.opts.dir.join(format!("{prefix}js{i}")).display(),
                cluster[i],
                routes.join(", ")
            );
            std::fs::write(&conf, text)
                .map_err(|e| DrillError::Deployment(format!("writing {}: {e}", conf.display())))?;
            servers.push(NatsServer {
                name,
                region: region.into(),
                conf,
                client_port: client[i],
                http_port: http[i],
                child: None,
            });
        }
        Ok(servers)
    }

    /// The backup key and the store the nodes ship to: a bucket of a local object store
    /// started here, or a directory.
    async fn configure_backup(&mut self) -> Result<(), DrillError> {
        let key = self.backup_key_file();
        self.haven_command(
            "haven backup keygen",
            &[
                "backup".as_ref(),
                "keygen".as_ref(),
                "--out".as_ref(),
                key.as_os_str(),
            ],
            &[],
        )
        .await?;
        let backup = match self.opts.backup.clone() {
            BackupStore::Off => return Ok(()),
            BackupStore::Directory => (
                self.opts.dir.join("backup").display().to_string(),
                Vec::new(),
            ),
            BackupStore::Moto(bin) => {
                let port = free_ports(1)?[0];
                let child = Command::new(&bin)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(log_file(&self.opts.dir.join("object-store.log"))?)
                    .spawn()
                    .map_err(|e| {
                        DrillError::Deployment(format!("starting {}: {e}", bin.display()))
                    })?;
                self.moto = Some(child);
                let endpoint = format!("http://127.0.0.1:{port}");
                // The bucket, once the object store answers (at most 30 s).
                let client = reqwest::Client::new();
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match client
                        .put(format!("{endpoint}/{BUCKET}"))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => break,
                        Ok(r) => {
                            return Err(DrillError::Deployment(format!(
                                "creating the backup bucket: {}",
                                r.status()
                            )));
                        }
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => {
                            return Err(DrillError::Deployment(format!(
                                "the local object store did not answer within 30 s: {e}; its log ends with:\n{}",
                                log_tail(&self.opts.dir.join("object-store.log"), 10)
                            )));
                        }
                    }
                }
                (
                    format!("s3://{BUCKET}/backups"),
                    vec![
                        ("AWS_ENDPOINT_URL".to_owned(), endpoint),
                        ("AWS_ACCESS_KEY_ID".to_owned(), "drill".to_owned()),
                        ("AWS_SECRET_ACCESS_KEY".to_owned(), "drill".to_owned()),
                        ("AWS_REGION".to_owned(), "us-east-1".to_owned()),
                    ],
                )
            }
        };
        self.backup = Some(backup);
        Ok(())
    }

    fn backup_key_file(&self) -> PathBuf {
        self.opts.dir.join("backup.key")
    }

    /// Runs this `haven` binary with `args` (and `env`) to its end, off the runtime's
    /// threads; its standard output, or what it said when it failed.
    async fn haven_command(
        &self,
        what: &str,
        args: &[&std::ffi::OsStr],
        env: &[(String, String)],
    ) -> Result<String, DrillError> {
        let mut cmd = Command::new(&self.opts.haven);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let what = what.to_owned();
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(|e| DrillError::Deployment(format!("{what}: {e}")))?
            .map_err(|e| DrillError::Deployment(format!("running {what}: {e}")))?;
        if !out.status.success() {
            return Err(DrillError::Deployment(format!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the nodes ship a backup.
    pub fn has_backup(&self) -> bool {
        self.backup.is_some()
    }

    /// Where the backup goes, in words (`None`: no backup).
    pub fn backup_place(&self) -> Option<&'static str> {
        self.backup.as_ref().map(|_| {
            if self.moto.is_some() {
                "a bucket of a local object store (moto)"
            } else {
                "a directory"
            }
        })
    }

    /// The whole region lost with its disks: every node and NATS server `kill -9`, their data
    /// directories removed.
    pub fn lose_region(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
            let _ = std::fs::remove_dir_all(self.node_data(i));
        }
        for i in 0..self.nats.len() {
            self.kill_nats(i);
            let _ = std::fs::remove_dir_all(self.nats_store(i));
        }
    }

    /// Stops whatever still runs of the region's nodes, builds a new region from the backup
    /// (`haven region bootstrap`, at `at` (RFC 3339) or the latest point) on three new NATS
    /// servers, decommissions the old ones, and starts every node in the new region (same addresses, so the load balancer
    /// finds them; fresh data directories). The new region's name.
    pub async fn restore_region(&mut self, at: Option<&str>) -> Result<String, DrillError> {
        let Some((url, env)) = self.backup.clone() else {
            return Err(DrillError::Usage(
                "restoring needs a deployment whose nodes ship a backup".into(),
            ));
        };
        let region = format!("drill-r{}", self.restores + 1);
        // The old region is taken out of service first: no client writes to it any more.
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        let old: Vec<usize> = (0..self.nats.len()).collect();
        let first = self.nats.len();
        let fresh = self.configure_nats(&region, true).await?;
        self.nats.extend(fresh);
        for i in first..self.nats.len() {
            self.spawn_nats(i)?;
        }
        for i in first..self.nats.len() {
            self.wait_nats(i).await?;
        }
        // A new cluster answers its JetStream API once it has elected a metadata leader,
        // which its full health check waits for (at most 60 s).
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in first..self.nats.len() {
            let url = format!("http://127.0.0.1:{}/healthz", self.nats[i].http_port);
            while http_status(&client, &url).await != Some(200) {
                if Instant::now() > deadline {
                    return Err(DrillError::Deployment(format!(
                        "the new region's NATS server {} did not become healthy within 60 s",
                        self.nats[i].name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let store = self.nats[first..]
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect::<Vec<_>>()
            .join(",");
        let key = self.backup_key_file();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "region".as_ref(),
            "bootstrap".as_ref(),
            "--backup-url".as_ref(),
            url.as_ref(),
            "--backup-key-file".as_ref(),
            key.as_os_str(),
            "--store".as_ref(),
            store.as_ref(),
            "--region".as_ref(),
            region.as_ref(),
            "--store-replicas".as_ref(),
            "3".as_ref(),
        ];
        if let Some(at) = at {
            args.push(std::ffi::OsStr::new("--at"));
            args.push(std::ffi::OsStr::new(at));
        }
        let said = self
            .haven_command("haven region bootstrap", &args, &env)
            .await?;
        tracing::info!("haven region bootstrap: {}", said.trim());
        // The old region's servers are decommissioned.
        for &i in old.iter().rev() {
            self.kill_nats(i);
            self.nats.remove(i);
        }
        if self.opts.links {
            self.links.clear();
            for _ in 0..self.nodes.len() {
                let mut row = Vec::new();
                for s in &self.nats {
                    row.push(Link::start(s.client_port).await?);
                }
                self.links.push(row);
            }
        }
        self.restores += 1;
        let lost = self.nodes[0].region.clone();
        for i in 0..self.nodes.len() {
            self.nodes[i].region = region.clone();
            self.start_node(i).await?;
        }
        // The old region's running work came back with the state: the new region takes it
        // over (every process of the old region is stopped), so each of those requests is
        // settled once, by re-running it or answering that it was interrupted.
        let r = reqwest::Client::new()
            .post(format!(
                "{}/admin/v1/regions/takeover?region={lost}&confirm_dead=true",
                self.node_bases()[0]
            ))
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| DrillError::Deployment(format!("regions/takeover: {e}")))?;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(DrillError::Deployment(format!(
                "taking over region {lost}'s work in {region}: {status}: {body}"
            )));
        }
        tracing::info!("region {region} took over region {lost}'s running work: {body}");
        Ok(region)
    }

    /// Mounts a tmpfs of 1 GiB on each NATS server's store directory; none when one cannot
    /// be mounted (without root), said in the log.
    fn mount_disks(&mut self) {
        let mut mounted: Vec<PathBuf> = Vec::new();
        for i in 0..self.nats.len() {
            let dir = self.nats_store(i);
            if let Err(e) = std::fs::create_dir_all(&dir)
                .map_err(|e| e.to_string())
                .and_then(|()| mount_tmpfs(&dir))
            {
                tracing::warn!(
                    "no file system of its own for {}'s store ({e}): the disk faults are skipped",
                    self.nats[i].name
                );
                for m in &mounted {
                    unmount(m);
                }
                return;
            }
            mounted.push(dir);
        }
        self.mounts = mounted;
    }

    /// Whether the NATS servers' stores are on file systems of their own (faults can fill
    /// them).
    pub fn has_disks(&self) -> bool {
        !self.mounts.is_empty()
    }

    /// Fills NATS server `i`'s file system with a file of its own until no block is left
    /// (a deployment with disks); what went wrong, if anything.
    pub fn fill_disk(&self, i: usize) -> Result<(), String> {
        use std::io::Write as _;
        let dir = self.mounts.get(i).ok_or("no file system of its own")?;
        let free = free_bytes(dir)?;
        let mut f = std::fs::File::create(dir.join("filler")).map_err(|e| e.to_string())?;
        // All but the last MiB at once (the server writes meanwhile), then block by block.
        let len = free.saturating_sub(1 << 20) as libc::off_t;
        if len > 0 {
            // SAFETY: posix_fallocate(3) on a file descriptor this function owns.
            let r = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, len) };
            if r != 0 {
                return Err(format!(
                    "fallocate: {}",
                    std::io::Error::from_raw_os_error(r)
                ));
            }
        }
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(|e| e.to_string())?;
        let block = [0u8; 4096];
        for _ in 0..1024 {
            match f.write_all(&block).and_then(|()| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
                Err(e) => return Err(format!("writing the filler: {e}")),
            }
        }
        Err("the file system did not fill up".into())
    }

    /// Frees what [`Local::fill_disk`] took.
    pub fn free_disk(&self, i: usize) {
        if let Some(dir) = self.mounts.get(i) {
            let _ = std::fs::remove_file(dir.join("filler"));
        }
    }

    fn nats_store(&self, i: usize) -> PathBuf {
        let name = &self.nats[i].name;
        let js = match name.rsplit_once("nats") {
            Some((prefix, n)) => format!("{prefix}js{n}"),
            None => name.clone(),
        };
        self.opts.dir.join(js)
    }

    /// Node `i`'s data directory: its name, and its region's after a restore.
    fn node_data(&self, i: usize) -> PathBuf {
        let n = &self.nodes[i];
        if n.region.starts_with("drill-r") {
            self.opts.dir.join(format!("{}-{}", n.name, n.region))
        } else {
            self.opts.dir.join(&n.name)
        }
    }

    fn spawn_nats(&mut self, i: usize) -> Result<(), DrillError> {
        let s = &self.nats[i];
        let child = Command::new(&self.opts.nats_server)
            .arg("-c")
            .arg(&s.conf)
            .stdout(Stdio::null())
            .stderr(log_file(&s.conf.with_extension("log"))?)
            .spawn()
            .map_err(|e| DrillError::Deployment(format!("starting nats-server: {e}")))?;
        self.nats[i].child = Some(child);
        Ok(())
    }

    /// Waits until NATS server `i` reports JetStream healthy (at most 120 s).
    async fn wait_nats(&mut self, i: usize) -> Result<(), DrillError> {
        let client = reqwest::Client::new();
        let url = format!(
            "http://127.0.0.1:{}/healthz?js-enabled-only=true",
            self.nats[i].http_port
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if http_status(&client, &url).await == Some(200) {
                return Ok(());
            }
            let exited = self.nats[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                return Err(DrillError::Deployment(format!(
                    "nats-server {} did not become healthy; its log ends with:\n{}",
                    self.nats[i].name,
                    log_tail(&self.nats[i].conf.with_extension("log"), 10)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The `--store` of node `i`: the NATS servers, or its links to them.
    fn store_url(&self, i: usize) -> String {
        let region = &self.nodes[i].region;
        let ports: Vec<u16> = match self.links.get(i) {
            Some(row) => row.iter().map(|l| l.port).collect(),
            None => self
                .nats
                .iter()
                .filter(|s| &s.region == region)
                .map(|s| s.client_port)
                .collect(),
        };
        ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn node_log(&self, i: usize) -> PathBuf {
        self.opts.dir.join(format!("{}.log", self.nodes[i].name))
    }

    /// Starts Haven node `i` (on its data, if it ran before) and waits until it is ready.
    pub async fn start_node(&mut self, i: usize) -> Result<(), DrillError> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(&self.opts.haven);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", node.port)])
            .arg("--data")
            .arg(self.node_data(i))
            .args(["--store", &self.store_url(i), "--region", &node.region])
            .args(["--node-id", &node.name]);
        if self.opts.two_regions {
            let peer = if node.region == "A" { "B" } else { "A" };
            cmd.args(["--store-replicas", "1", "--peer-regions", peer])
                .args(["--region-check-interval", "1s"]);
        }
        if let Some((url, env)) = &self.backup {
            cmd.args(["--backup-url", url])
                .arg("--backup-key-file")
                .arg(self.backup_key_file())
                .args(["--backup-interval", "1s"])
                .envs(env.iter().map(|(k, v)| (k, v)));
        }
        let child = cmd
            .arg("--secrets-key-file")
            .arg(self.key_file())
            .env("HAVEN_ADMIN_TOKEN", &self.admin_token)
            .env("HAVEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(&self.node_log(i))?)
            .spawn()
            .map_err(|e| DrillError::Deployment(format!("starting haven: {e}")))?;
        self.nodes[i].child = Some(child);
        self.wait_node(i).await
    }

    async fn wait_node(&mut self, i: usize) -> Result<(), DrillError> {
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/readyz", self.nodes[i].port);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if http_status(&client, &url).await == Some(200) {
                return Ok(());
            }
            let exited = self.nodes[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                return Err(DrillError::Deployment(format!(
                    "haven {} did not become ready; its log ends with:\n{}",
                    self.nodes[i].name,
                    log_tail(&self.node_log(i), 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts HAProxy in front of the nodes. Each node gets at most
    /// [`LB_MAXCONN_PER_NODE`] requests at once; more wait in HAProxy's queue for at most 1 s
    /// and are then answered 503 with `Retry-After`, so that an overload waits in a bounded
    /// queue ahead of the nodes instead of in their runtimes (health checks do not count).
    async fn start_haproxy(&mut self) -> Result<(), DrillError> {
        let port = free_ports(1)?[0];
        let servers: String = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "    server {} 127.0.0.1:{} check inter 200ms fall 1 rise 2 maxconn {LB_MAXCONN_PER_NODE}\n",
                    n.name, n.port
                )
            })
            .collect();
        let conf = self.opts.dir.join("haproxy.cfg");
        let global = |kind: &str| -> String {
            self.nodes
                .iter()
                .map(|n| {
                    format!(
                        "    server {kind}-{} 127.0.0.1:{} check inter 500ms fall 2 rise 2\n",
                        n.name, n.port
                    )
                })
                .collect()
        };
        let proxies = if self.opts.two_regions {
            // The README's global load balancer: /regionz answers 200 only from the active
            // region's caught-up nodes; with none, the first ready node in the list serves
            // (every client to one region: spread over both, a client's session or task made
            // in one region would be looked up in the other, which may not have it yet).
            format!(
                "frontend mcp\n    bind 127.0.0.1:{port}\n    use_backend active if {{ nbsrv(active) gt 0 }}\n    default_backend standby\n\nbackend active\n    option httpchk GET /regionz\n    http-check expect status 200\n{}\nbackend standby\n    balance first\n    option httpchk GET /readyz\n    http-check expect status 200\n{}",
                global("a"),
                global("s")
            )
        } else {
            format!(
                "frontend mcp\n    bind 127.0.0.1:{port}\n    default_backend haven\n\nbackend haven\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n{servers}"
            )
        };
        // HAProxy's own 503s (its queue for the nodes full past `timeout queue`, or no node
        // up) carry `Retry-After` and a JSON-RPC error body, like the nodes' own.
        let busy = self.opts.dir.join("503.http");
        std::fs::write(&busy, LB_503)
            .map_err(|e| DrillError::Deployment(format!("writing {}: {e}", busy.display())))?;
        let text = format!(
            "global\n    maxconn 4000\n\ndefaults\n    mode http\n    timeout connect 200ms\n    timeout check 2s\n    timeout client 120s\n    timeout server 120s\n    timeout queue 250ms\n    errorfile 503 {}\n    retries 3\n    option redispatch\n    option http-server-close\n    retry-on conn-failure empty-response\n\n{proxies}",
            busy.display()
        );
        std::fs::write(&conf, text)
            .map_err(|e| DrillError::Deployment(format!("writing {}: {e}", conf.display())))?;
        let child = Command::new(&self.opts.haproxy)
            .arg("-f")
            .arg(&conf)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(log_file(&self.opts.dir.join("haproxy.log"))?)
            .spawn()
            .map_err(|e| DrillError::Deployment(format!("starting haproxy: {e}")))?;
        self.haproxy = Some(child);
        self.lb_port = port;
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_status(&client, &url).await != Some(200) {
            if Instant::now() > deadline {
                return Err(DrillError::Deployment(format!(
                    "haproxy did not answer /readyz; its log ends with:\n{}",
                    log_tail(&self.opts.dir.join("haproxy.log"), 10)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The load balancer's base URL (`http://127.0.0.1:PORT`).
    pub fn lb_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.lb_port)
    }

    /// Every node's base URL.
    pub fn node_bases(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The admin token every node accepts.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Node `i`'s name.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// NATS server `i`'s name.
    pub fn nats_name(&self, i: usize) -> &str {
        &self.nats[i].name
    }

    /// How many NATS servers.
    pub fn nats_count(&self) -> usize {
        self.nats.len()
    }

    /// `kill -9` of node `i`.
    pub fn kill_node(&mut self, i: usize) {
        stop_child(&mut self.nodes[i].child);
    }

    /// SIGTERM to node `i` (a graceful drain), then waits for it to exit (at most 60 s, then
    /// `kill -9`).
    pub async fn drain_node(&mut self, i: usize) -> Result<(), DrillError> {
        let Some(mut child) = self.nodes[i].child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) of a child process this deployment started and still owns.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DrillError::Deployment(format!(
                    "{} did not exit within 60 s of SIGTERM",
                    self.nodes[i].name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) of node `i`.
    pub fn pause_node(&self, i: usize, stop: bool) {
        signal(self.nodes[i].child.as_ref(), stop);
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) of NATS server `i`.
    pub fn pause_nats(&self, i: usize, stop: bool) {
        signal(self.nats[i].child.as_ref(), stop);
    }

    /// Sets every link of node `i` to the NATS servers (a deployment started with links).
    pub fn set_node_links(&self, i: usize, state: LinkState) {
        if let Some(row) = self.links.get(i) {
            for l in row {
                l.set(state);
            }
        }
    }

    /// Sets the route links between NATS server `i` and every other one, both ways (a
    /// deployment started with links): cut, it is partitioned from the cluster while its
    /// clients still reach it.
    pub fn set_nats_links(&self, i: usize, state: LinkState) {
        for (from, row) in self.routes.iter().enumerate() {
            for (to, link) in row.iter().enumerate() {
                if let Some(l) = link
                    && (from == i || to == i)
                {
                    l.set(state);
                }
            }
        }
    }

    /// How many routes to other servers NATS server `i` has (its monitoring's `/routez`), or
    /// `None` when it does not answer.
    pub async fn nats_routes(&self, i: usize) -> Option<u64> {
        let r = reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/routez",
                self.nats[i].http_port
            ))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        v["num_routes"].as_u64()
    }

    /// `kill -9` of NATS server `i`.
    pub fn kill_nats(&mut self, i: usize) {
        stop_child(&mut self.nats[i].child);
    }

    /// Starts NATS server `i` again on its data and waits until it is healthy.
    pub async fn start_nats(&mut self, i: usize) -> Result<(), DrillError> {
        self.spawn_nats(i)?;
        self.wait_nats(i).await
    }

    /// Starts every stopped NATS server and waits until all are healthy.
    pub async fn start_all_nats(&mut self) -> Result<(), DrillError> {
        let stopped: Vec<usize> = (0..self.nats.len())
            .filter(|i| self.nats[*i].child.is_none())
            .collect();
        for &i in &stopped {
            self.spawn_nats(i)?;
        }
        for i in stopped {
            self.wait_nats(i).await?;
        }
        Ok(())
    }

    /// Starts whatever is stopped and waits until every NATS server is healthy and every
    /// node ready: the state each drill starts from.
    pub async fn ensure_all_ready(&mut self) -> Result<(), DrillError> {
        self.start_all_nats().await?;
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.start_node(i).await?;
            } else {
                self.wait_node(i).await?;
            }
        }
        Ok(())
    }

    /// The NATS server that leads the region's stream, as a running node reports it.
    pub async fn stream_leader(&self) -> Option<usize> {
        let client = reqwest::Client::new();
        for base in self.node_bases() {
            let Ok(r) = client
                .get(format!("{base}/admin/v1/status"))
                .bearer_auth(&self.admin_token)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = r.json::<serde_json::Value>().await else {
                continue;
            };
            if let Some(leader) = v["store"]["leader"].as_str() {
                return self.nats.iter().position(|s| s.name == leader);
            }
        }
        None
    }

    /// The directory of configuration, data and logs.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }
}

/// Mounts a tmpfs of 1 GiB on `dir`.
fn mount_tmpfs(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=1g".as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(format!("mount: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Detaches the file system mounted on `dir` (at once, even while something still has it
/// open).
fn unmount(dir: &Path) {
    use std::os::unix::ffi::OsStrExt as _;
    if let Ok(target) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: umount2(2) with a NUL-terminated string that outlives the call.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Bytes free for an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs(3) writes into a zeroed struct this function owns.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if r != 0 {
        return Err(format!("statvfs: {}", std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn signal(child: Option<&Child>, stop: bool) {
    if let Some(c) = child {
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) of a child process this deployment started and still owns.
        unsafe {
            libc::kill(c.id() as libc::pid_t, sig);
        }
    }
}

/// `bin` itself when it is a path to a file, else its place on `PATH`.
pub fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
