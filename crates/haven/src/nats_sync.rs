//! Whether the NATS servers sync every write to disk before acknowledging it (JetStream's
//! `sync_interval: always`). Without it a server fsyncs every 2 minutes, and a correlated
//! crash (the servers losing power together) can lose writes Haven already acknowledged.
//!
//! A client connection cannot learn it: neither the server's INFO nor JetStream's account
//! info (`$JS.API.INFO`) carries the server's JetStream configuration, and the server
//! requests that do (`$SYS.REQ.SERVER.*.VARZ`/`JSZ`) need the system account. The monitoring
//! port's `/varz` has it (`jetstream.config.sync_always`), so a node given the servers'
//! monitoring endpoints (`--nats-monitor`) reads each one at start and warns when one does not
//! sync every write; the result is in `/admin/v1/status` (`store.sync`) and `haven status`.

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};

/// What the start-up check found (`None` before it ran).
static FOUND: OnceLock<Value> = OnceLock::new();

/// The warning logged for a server that does not sync every write.
pub const NOT_SYNCED: &str = "this NATS server does not sync every write to disk (jetstream { sync_interval: always } is not set): writes Haven acknowledged can be lost if the servers crash together";

/// Reads `/varz` of each monitoring endpoint (2 s each), logs a warning for a server that
/// does not sync every write (or whose answer cannot be read), and keeps the result for the
/// status.
pub async fn check(monitors: &[String]) {
    let found = if monitors.is_empty() {
        tracing::info!(
            "whether the NATS servers sync every write (sync_interval: always) is not checked: give --nats-monitor http://HOST:8222,... to check it at start"
        );
        json!({ "checked": false })
    } else {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("a plain HTTP client builds");
        let mut servers = Vec::new();
        let mut all: Option<bool> = Some(true);
        for m in monitors {
            match varz(&client, m).await {
                Ok(v) => {
                    let name = v["server_name"].as_str().unwrap_or("?").to_owned();
                    let config = &v["jetstream"]["config"];
                    let always = config["sync_always"].as_bool().unwrap_or(false);
                    if !always {
                        tracing::warn!(server = %name, monitor = %m, sync_interval_ns = %config["sync_interval"], "{NOT_SYNCED}");
                        all = Some(false);
                    }
                    servers.push(json!({ "monitor": m, "server": name, "sync_always": always }));
                }
                Err(e) => {
                    tracing::warn!(monitor = %m, error = %e, "cannot read the NATS server's /varz: whether it syncs every write is unknown");
                    if all == Some(true) {
                        all = None;
                    }
                    servers.push(json!({ "monitor": m, "error": e }));
                }
            }
        }
        json!({ "checked": true, "sync_always": all, "servers": servers })
    };
    let _ = FOUND.set(found);
}

async fn varz(client: &reqwest::Client, monitor: &str) -> Result<Value, String> {
    let r = client
        .get(format!("{monitor}/varz"))
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status()));
    }
    r.json::<Value>().await.map_err(|e| format!("{e}"))
}

/// The start-up check's result, for the status (`{"checked": false}` when not checked).
pub fn found() -> Value {
    FOUND.get().cloned().unwrap_or(json!({ "checked": false }))
}
