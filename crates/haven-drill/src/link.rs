//! A TCP link between two processes of a local deployment that faults can cut or slow: every
//! connection through it is relayed, each chunk held back by the latency set; a cut closes
//! every connection at once and refuses new ones until healed.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::DrillError;

/// What the link does now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Every connection closed, new ones refused.
    pub cut: bool,
    /// Added to every chunk relayed, each way.
    pub latency_ms: u64,
}

/// A running link (stopped when dropped).
pub struct Link {
    /// The port to connect to instead of the target's.
    pub port: u16,
    state: watch::Sender<LinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.state.send_replace(LinkState {
            cut: true,
            latency_ms: 0,
        });
        self.task.abort();
    }
}

impl Link {
    /// A link to `target` on loopback.
    pub async fn start(target: u16) -> Result<Link, DrillError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| DrillError::Deployment(format!("a link's listener: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| DrillError::Deployment(e.to_string()))?
            .port();
        let (state, watch) = watch::channel(LinkState::default());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if watch.borrow().cut {
                    drop(inbound);
                    continue;
                }
                let watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let mut w1 = watch.clone();
                    let mut w2 = watch.clone();
                    tokio::select! {
                        _ = relay(ri, wo, watch.clone()) => {}
                        _ = relay(ro, wi, watch) => {}
                        _ = w1.wait_for(|s| s.cut) => {}
                        _ = w2.wait_for(|s| s.cut) => {}
                    }
                });
            }
        });
        Ok(Link { port, state, task })
    }

    /// Sets what the link does.
    pub fn set(&self, state: LinkState) {
        self.state.send_replace(state);
    }
}

/// Copies one direction, holding each chunk back by the latency in force.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: watch::Receiver<LinkState>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let latency = state.borrow().latency_ms;
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
