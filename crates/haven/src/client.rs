//! The client side of the admin API, shared by the commands that talk to a running node
//! (`haven status`, `haven backup now`, `haven registry|config|secrets`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The URL of the admin API a command asks: `--node` (or `HAVEN_NODE`); else the one the node
/// wrote into its data directory at start (`DATA/admin.url`: its admin listener's address,
/// `--admin-listen`, or else its MCP listener's), with `--data` or `./haven-data`; else the
/// local default.
pub fn node_url(node: Option<&String>, data: Option<&PathBuf>) -> String {
    if let Some(n) = node {
        return n.clone();
    }
    let file = data
        .cloned()
        .unwrap_or_else(|| PathBuf::from("./haven-data"))
        .join("admin.url");
    std::fs::read_to_string(file)
        .ok()
        .map(|u| u.trim().to_owned())
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .unwrap_or_else(|| "http://127.0.0.1:8080".into())
}

/// The admin token: `HAVEN_ADMIN_TOKEN` if set, else the token file (`--admin-token-file`, or
/// `admin.token` in the node's data directory).
pub fn token(file: Option<&PathBuf>, data: Option<&PathBuf>) -> Result<String> {
    if file.is_none()
        && let Ok(t) = std::env::var("HAVEN_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    let path = match file {
        Some(f) => f.clone(),
        None => data
            .cloned()
            .unwrap_or_else(|| PathBuf::from("./haven-data"))
            .join("admin.token"),
    };
    if path.exists() {
        haven_state::files::check_private_file(&path, "admin token file")?;
    }
    let t = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the admin token {} (pass --admin-token-file or --data of the node, or set HAVEN_ADMIN_TOKEN)",
            path.display()
        )
    })?;
    let t = t.trim();
    if t.is_empty() {
        bail!(
            "the admin token file {} is empty; it is created by `haven serve` in its data directory",
            path.display()
        );
    }
    Ok(t.to_owned())
}

/// The CA file the admin calls trust (`--ca-file`), set once at start.
static CA_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Sets the CA file the admin calls trust for an https:// node (`None`: the system's roots).
pub fn set_ca_file(ca: Option<PathBuf>) {
    let _ = CA_FILE.set(ca);
}

/// The HTTP client of the admin calls: an https:// node is verified against `--ca-file`
/// (`HAVEN_CA_FILE`), else the system's roots.
fn http_client() -> Result<reqwest::Client> {
    let ca = CA_FILE.get().cloned().flatten();
    let tls = haven_state::tls::client_config(ca.as_deref(), None).map_err(|e| match &ca {
        Some(f) => anyhow::anyhow!("--ca-file {}: {e}", f.display()),
        None => anyhow::anyhow!("{e}"),
    })?;
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .use_preconfigured_tls(tls)
        .build()?)
}

/// Calls the admin API without a body.
pub async fn admin_call(
    node: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> Result<serde_json::Value> {
    admin_request(node, token, method, path, None).await
}

/// Calls the admin API; a non-2xx answer becomes an error carrying the node's message.
pub async fn admin_request(
    node: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    let url = format!("{}{path}", node.trim_end_matches('/'));
    let client = http_client()?;
    let mut req = client.request(method, &url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| {
        // A TLS failure (an unknown CA, a certificate for another name) says so.
        let mut chain = String::new();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            chain.push_str(": ");
            chain.push_str(&err.to_string());
            source = err.source();
        }
        if node.starts_with("https://") {
            anyhow::anyhow!(
                "cannot reach the node at {node}{chain}; is `haven serve` running there, and does --ca-file (HAVEN_CA_FILE) name the CA of its certificate?"
            )
        } else {
            anyhow::anyhow!(
                "cannot reach the node at {node}{chain}; is `haven serve` running there?"
            )
        }
    })?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let Some(msg) = body.get("error").and_then(|e| e.as_str()) else {
            if status == reqwest::StatusCode::NOT_FOUND {
                bail!(
                    "{node} answered 404 to {path}: no admin API is served there; a node started with --admin-listen ADDR serves it only on that address: pass --node http://ADDR (or --data of the node, whose admin.url names it)"
                );
            }
            bail!("the node answered {status}: no details");
        };
        bail!("the node answered {status}: {msg}");
    }
    Ok(body)
}

/// Percent-encodes one path segment (names may hold `/`, which secret routes accept as is).
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
