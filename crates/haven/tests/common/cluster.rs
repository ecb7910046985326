//! A region on loopback: three nats-server processes in one JetStream cluster, Haven nodes on
//! it, and HAProxy in front (the processes come from `haven-testkit`). Every process is
//! stopped when its handle is dropped.

use std::path::Path;

pub use haven_testkit::{NatsCluster, Proxy, http_status, tools_dir};

use super::Haven;

/// Starts a Haven node of region `r1` on the cluster.
pub async fn haven_node(
    nats: &NatsCluster,
    data: &Path,
    port: u16,
    node: &str,
    extra: &[&str],
) -> Haven {
    let store = nats.store_url();
    let mut args = vec![
        "--store",
        store.as_str(),
        "--region",
        "r1",
        "--node-id",
        node,
    ];
    args.extend_from_slice(extra);
    Haven::start(data, port, "default", &args).await
}
