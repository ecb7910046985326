//! Issue 13 §1 on the real binary: TLS on the MCP listener and the admin API (TLS 1.3 unless
//! 1.2 is asked for), certificates reloaded while serving, an unfinished handshake closed, a
//! key file others may read refused, the CLI over an https admin API, TLS with client
//! certificates to NATS, and https upstreams verified against a given CA.
//!
//! Certificates are made by the test (rcgen): one test CA issues every server certificate,
//! for `127.0.0.1` and `localhost`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Legacy, free_port, haven_bin, write_key_file};
use haven_testkit::wait_until;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test CA, which signs the servers' and clients' certificates.
struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for 127.0.0.1 and localhost named `cn`: (certificate PEM, key PEM).
    fn issue(&self, cn: &str, client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// A directory with the CA's certificate (`ca.pem`) and a server pair (`cert.pem`,
/// `key.pem`, 0600).
struct Files {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("haven test CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let f = Files { dir, ca };
        f.write_pair("cert.pem", "key.pem", &f.ca.issue("haven-one", false));
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Writes a pair; the key is replaced by a rename (as deployment tooling does).
    fn write_pair(&self, cert: &str, key: &str, (c, k): &(String, String)) {
        std::fs::write(self.path(cert), c).unwrap();
        let tmp = self.path(&format!("{key}.tmp"));
        write_key_file(&tmp, k);
        std::fs::rename(&tmp, self.path(key)).unwrap();
    }

    fn tls_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.s("cert.pem"),
            "--tls-key".into(),
            self.s("key.pem"),
        ]
    }
}

fn leaf_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A rustls client trusting the test CA, offering `versions` only.
fn client_config(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `port` with `config`.
async fn connect(port: u16, config: rustls::ClientConfig) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

/// The server's leaf certificate on a new TLS 1.3 connection.
async fn served_leaf(port: u16, ca: &Ca) -> Vec<u8> {
    let s = connect(port, client_config(ca, &[&rustls::version::TLS13]))
        .await
        .unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// `GET /healthz` on an open connection (keep-alive); the status code.
async fn healthz_on(s: &mut Tls) -> u16 {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text[9..12].parse().unwrap();
            }
        }
    }
}

/// A reqwest client trusting the test CA (TLS 1.3 only).
fn https_client(ca: &Ca) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(ca, &[&rustls::version::TLS13]))
        .build()
        .unwrap()
}

/// A running `haven serve`, killed when dropped.
struct Node {
    child: Child,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn spawn(data: &Path, extra: &[String], env: &[(&str, &str)]) -> Node {
        let port = free_port();
        let log = data.with_extension(format!("{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(haven_bin())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .args(extra)
            .envs(env.iter().copied())
            .env("HAVEN_LOG", "info")
            .env_remove("HAVEN_ADMIN_TOKEN")
            .env_remove("HAVEN_NODE")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Node {
            child,
            port,
            data: data.to_owned(),
            log,
            _dir: None,
        }
    }

    /// Starts a node serving TLS and waits until `/readyz` answers 200 over https.
    async fn start(ca: &Ca, extra: &[String], env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut n = Node::spawn(&dir.path().join("data"), extra, env);
        n._dir = Some(dir);
        n.wait_ready(ca).await;
        n
    }

    async fn wait_ready(&mut self, ca: &Ca) {
        let client = https_client(ca);
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(r) = client
                .get(format!("https://127.0.0.1:{}/readyz", self.port))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("haven exited ({s}); log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("haven did not become ready; log:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/mcp", self.port)
    }

    /// Waits (bounded) until the log holds `needle`.
    async fn wait_logged(&self, needle: &str) {
        let logged = wait_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async { self.log_text().contains(needle) },
        )
        .await;
        assert!(
            logged,
            "{needle:?} was not logged; log:\n{}",
            self.log_text()
        );
    }
}

/// Waits (bounded: a guard against a hang) until `child` exits; its stderr log.
async fn exited(child: &mut Child, log: &Path, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "haven exited with success");
            return std::fs::read_to_string(log).unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "haven is still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A legacy-era session over https with `client`.
async fn legacy(client: reqwest::Client, url: &str) -> Legacy {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":common::LEGACY,"capabilities":{},"clientInfo":{"name":"tls-test","version":"1"}}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert!(body["result"]["serverInfo"].is_object(), "{body}");
    let l = Legacy {
        client,
        url: url.to_owned(),
        session,
    };
    let r = l
        .post_raw(json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
        .await;
    assert_eq!(r.status(), 202);
    l
}

fn text_of(r: &Value) -> String {
    r["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `haven ARGS` (a client command) with `env`; its output.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(haven_bin())
        .args(args)
        .env_remove("HAVEN_ADMIN_TOKEN")
        .env_remove("HAVEN_NODE")
        .env_remove("HAVEN_CA_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn tls13_is_required_by_default_and_mcp_works_over_https() {
    let f = Files::new();
    let node = Node::start(&f.ca, &f.tls_args(), &[]).await;

    // A client offering only TLS 1.2 is refused.
    let refused = connect(node.port, client_config(&f.ca, &[&rustls::version::TLS12])).await;
    assert!(refused.is_err(), "a TLS 1.2-only client was accepted");
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", node.port))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // TLS 1.3: the health endpoints, and MCP initialize + tools/call.
    let client = https_client(&f.ca);
    let r = client
        .get(format!("https://127.0.0.1:{}/healthz", node.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let l = legacy(client, &node.url()).await;
    let r = l.call_tool(1, "echo", json!({"text": "over tls"})).await;
    assert_eq!(text_of(&r), "over tls", "{r}");

    // With --tls-min-version 1.2, the TLS 1.2 client is accepted.
    let mut args = f.tls_args();
    args.extend(["--tls-min-version".into(), "1.2".into()]);
    let lenient = Node::start(&f.ca, &args, &[]).await;
    let mut s = connect(
        lenient.port,
        client_config(&f.ca, &[&rustls::version::TLS12]),
    )
    .await
    .expect("TLS 1.2 with --tls-min-version 1.2");
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(healthz_on(&mut s).await, 200);

    // An unknown version is refused at start.
    let dir = tempfile::tempdir().unwrap();
    let mut args = f.tls_args();
    args.extend(["--tls-min-version".into(), "1.1".into()]);
    let mut bad = Node::spawn(&dir.path().join("data"), &args, &[]);
    let log = exited(&mut bad.child, &bad.log, Duration::from_secs(60)).await;
    assert!(log.contains("tls_min_version"), "{log}");
}

#[tokio::test]
async fn the_certificate_is_reloaded_while_serving() {
    let f = Files::new();
    let node = Node::start(&f.ca, &f.tls_args(), &[]).await;
    let first = std::fs::read_to_string(f.path("cert.pem")).unwrap();
    assert_eq!(served_leaf(node.port, &f.ca).await, leaf_der(&first));

    // A keep-alive connection opened on the first certificate.
    let mut open = connect(node.port, client_config(&f.ca, &[&rustls::version::TLS13]))
        .await
        .unwrap();
    assert_eq!(healthz_on(&mut open).await, 200);

    // Replace the pair: new connections get the new certificate (another subject, serial).
    let second = f.ca.issue("haven-two", false);
    f.write_pair("cert.pem", "key.pem", &second);
    let served = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { served_leaf(node.port, &f.ca).await == leaf_der(&second.0) },
    )
    .await;
    assert!(
        served,
        "the new certificate was not served; log:\n{}",
        node.log_text()
    );
    node.wait_logged("TLS certificate reloaded").await;
    // The connection opened before still works.
    assert_eq!(healthz_on(&mut open).await, 200);

    // A broken pair (a certificate with another certificate's key) is refused; the second
    // pair stays in force.
    let third = f.ca.issue("haven-three", false);
    let fourth = f.ca.issue("haven-four", false);
    f.write_pair("cert.pem", "key.pem", &(third.0.clone(), fourth.1.clone()));
    node.wait_logged("TLS certificate not reloaded").await;
    assert!(
        node.log_text().contains("does not belong"),
        "{}",
        node.log_text()
    );
    assert_eq!(served_leaf(node.port, &f.ca).await, leaf_der(&second.0));
    // A key file others may read is refused as well.
    f.write_pair("cert.pem", "key.pem", &fourth);
    std::fs::set_permissions(f.path("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            node.log_text()
                .matches("TLS certificate not reloaded")
                .count()
                >= 2
        },
    )
    .await;
    assert!(refused, "{}", node.log_text());
    assert_eq!(served_leaf(node.port, &f.ca).await, leaf_der(&second.0));
    // Fixed: it is taken.
    std::fs::set_permissions(f.path("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let served = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { served_leaf(node.port, &f.ca).await == leaf_der(&fourth.0) },
    )
    .await;
    assert!(served, "{}", node.log_text());
}

#[tokio::test]
async fn an_unfinished_handshake_is_closed_and_an_open_key_file_is_refused() {
    let f = Files::new();
    let node = Node::start(&f.ca, &f.tls_args(), &[]).await;
    // The header read timeout (which bounds the handshake too), lowered through the admin API
    // over https with the CLI trusting the test CA.
    let data = node.data.display().to_string();
    let o = cli(
        &[
            "config",
            "set",
            "http.header_read_timeout_ms",
            "500",
            "--data",
            &data,
        ],
        &[("HAVEN_CA_FILE", &f.s("ca.pem"))],
    );
    assert!(o.status.success(), "{}", text(&o));
    // A connection that never starts its handshake is closed by the node.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut buf))
        .await
        .expect("the node did not close a connection that never completed its handshake");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Half a ClientHello, then nothing: closed as well.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut buf))
        .await
        .expect("the node did not close a connection with half a handshake");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The node still serves.
    assert!(!served_leaf(node.port, &f.ca).await.is_empty());
    drop(node);

    // A key file that others may read stops the start.
    std::fs::set_permissions(f.path("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut refused = Node::spawn(&dir.path().join("data"), &f.tls_args(), &[]);
    let log = exited(&mut refused.child, &refused.log, Duration::from_secs(60)).await;
    assert!(log.contains("TLS key file"), "{log}");
    assert!(
        !dir.path().join("data/state.redb").exists(),
        "the store was opened"
    );
    // A certificate without its key is refused too.
    let dir = tempfile::tempdir().unwrap();
    let mut refused = Node::spawn(
        &dir.path().join("data"),
        &["--tls-cert".into(), f.s("cert.pem")],
        &[],
    );
    let log = exited(&mut refused.child, &refused.log, Duration::from_secs(60)).await;
    assert!(log.contains("tls_key"), "{log}");
}

#[tokio::test]
async fn the_admin_api_and_the_cli_work_over_https() {
    let f = Files::new();
    // The admin API on the MCP listener, with its TLS.
    let node = Node::start(&f.ca, &f.tls_args(), &[]).await;
    let url = std::fs::read_to_string(node.data.join("admin.url")).unwrap();
    assert_eq!(url, format!("https://127.0.0.1:{}", node.port));
    let data = node.data.display().to_string();
    // Without the CA the CLI refuses the node's certificate, and says why.
    let o = cli(&["status", "--data", &data, "--json"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--ca-file"), "{}", text(&o));
    // With it (the flag, or HAVEN_CA_FILE), it works.
    let o = cli(
        &[
            "status",
            "--data",
            &data,
            "--json",
            "--ca-file",
            &f.s("ca.pem"),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let status: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(status["node"].is_string(), "{status}");
    let o = cli(
        &["registry", "list", "--data", &data],
        &[("HAVEN_CA_FILE", &f.s("ca.pem"))],
    );
    assert!(o.status.success(), "{}", text(&o));
    drop(node);

    // The admin API on a listener of its own with a pair of its own.
    let other = Ca::new("admin CA");
    std::fs::write(f.path("admin-ca.pem"), other.pem()).unwrap();
    f.write_pair(
        "admin-cert.pem",
        "admin-key.pem",
        &other.issue("haven-admin", false),
    );
    let admin_port = free_port();
    let mut args = f.tls_args();
    args.extend([
        "--admin-listen".into(),
        format!("127.0.0.1:{admin_port}"),
        "--admin-tls-cert".into(),
        f.s("admin-cert.pem"),
        "--admin-tls-key".into(),
        f.s("admin-key.pem"),
    ]);
    let node = Node::start(&f.ca, &args, &[]).await;
    let url = std::fs::read_to_string(node.data.join("admin.url")).unwrap();
    assert_eq!(url, format!("https://127.0.0.1:{admin_port}"));
    assert_eq!(
        served_leaf(admin_port, &other).await,
        leaf_der(&std::fs::read_to_string(f.path("admin-cert.pem")).unwrap())
    );
    let data = node.data.display().to_string();
    let o = cli(
        &["status", "--data", &data, "--ca-file", &f.s("ca.pem")],
        &[],
    );
    assert!(
        !o.status.success(),
        "the MCP listener's CA was trusted for the admin API"
    );
    let o = cli(
        &["status", "--data", &data, "--ca-file", &f.s("admin-ca.pem")],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[tokio::test]
async fn nats_over_tls_with_client_certificates() {
    let f = Files::new();
    f.write_pair("nats-cert.pem", "nats-key.pem", &f.ca.issue("nats", false));
    f.write_pair(
        "client-cert.pem",
        "client-key.pem",
        &f.ca.issue("haven-node", true),
    );
    let nats = haven_testkit::NatsCluster::start_tls(&format!(
        "cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 5",
        f.s("nats-cert.pem"),
        f.s("nats-key.pem"),
        f.s("ca.pem")
    ))
    .await;
    let store = nats.url(0);
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--store",
            store.as_str(),
            "--store-replicas",
            "1",
            "--region",
            "tls",
            "--nats-ca-file",
            &f.s("ca.pem"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(f.tls_args());
        v
    };
    let keys = [("HAVEN_SECRETS_KEYS", common::TEST_SECRETS_KEYS)];
    // With the client certificate: the node starts on the store and serves.
    let node = Node::start(
        &f.ca,
        &common(&[
            "--nats-cert",
            &f.s("client-cert.pem"),
            "--nats-key",
            &f.s("client-key.pem"),
        ]),
        &keys,
    )
    .await;
    let l = legacy(https_client(&f.ca), &node.url()).await;
    let r = l
        .call_tool(1, "echo", json!({"text": "stored in NATS"}))
        .await;
    assert_eq!(text_of(&r), "stored in NATS", "{r}");

    // Without it, the server refuses the node: it cannot open its store and exits.
    let dir = tempfile::tempdir().unwrap();
    let mut refused = Node::spawn(&dir.path().join("data"), &common(&[]), &keys);
    let log = exited(&mut refused.child, &refused.log, Duration::from_secs(180)).await;
    assert!(log.contains("NATS"), "{log}");
    // Without TLS at all, likewise (the server requires it).
    let dir = tempfile::tempdir().unwrap();
    let plain: Vec<String> = [
        "--store",
        store.as_str(),
        "--store-replicas",
        "1",
        "--region",
        "tls",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut refused = Node::spawn(&dir.path().join("data"), &plain, &keys);
    let log = exited(&mut refused.child, &refused.log, Duration::from_secs(180)).await;
    assert!(log.contains("NATS"), "{log}");
}

/// The upstream named `name` in the node's registry list (the admin API over https).
async fn upstream_status(node: &Node, ca: &Ca, name: &str) -> Value {
    let token = std::fs::read_to_string(node.data.join("admin.token")).unwrap();
    let list: Value = https_client(ca)
        .get(format!("https://127.0.0.1:{}/admin/v1/registry", node.port))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_system_roots_or_a_given_ca() {
    let f = Files::new();
    // The upstream: another Haven node serving MCP over TLS, its certificate from the test CA.
    let upstream = Node::start(&f.ca, &f.tls_args(), &[]).await;
    let up_url = upstream.url();
    // A node without --upstream-ca refuses the upstream's certificate.
    let strict = Node::start(&f.ca, &f.tls_args(), &[]).await;
    let ca = f.s("ca.pem");
    let add = |node: &Node| {
        cli(
            &[
                "registry",
                "add",
                "up",
                "--url",
                &up_url,
                "--data",
                &node.data.display().to_string(),
                "--ca-file",
                &ca,
            ],
            &[],
        )
    };
    let o = add(&strict);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let u = upstream_status(&strict, &f.ca, "up").await;
        if u["status"]["last_error"].is_string() {
            assert_ne!(u["status"]["state"], "connected", "{u}");
            // (rmcp's error does not carry the TLS cause: the reason is all it tells.)
            assert_eq!(u["status"]["last_error_reason"], "unreachable", "{u}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection error recorded: {u}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A node given the CA connects and serves the upstream's tools.
    let mut args = f.tls_args();
    args.extend(["--upstream-ca".into(), ca.clone()]);
    let trusting = Node::start(&f.ca, &args, &[]).await;
    let o = add(&trusting);
    assert!(o.status.success(), "{}", text(&o));
    let connected = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            upstream_status(&trusting, &f.ca, "up").await["status"]["state"] == "connected"
        },
    )
    .await;
    assert!(
        connected,
        "{}",
        upstream_status(&trusting, &f.ca, "up").await
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = legacy(https_client(&f.ca), &trusting.url()).await;
        let r = l
            .call_tool(1, "up__echo", json!({"text": "via https"}))
            .await;
        if text_of(&r) == "via https" {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The node without the CA still has no such tool.
    let l = legacy(https_client(&f.ca), &strict.url()).await;
    let r = l.call_tool(2, "up__echo", json!({"text": "x"})).await;
    assert_ne!(text_of(&r), "x", "{r}");
}
