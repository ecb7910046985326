//! Loopback ports for the processes a local deployment (or a test) starts.
//!
//! A port the system hands out for a bind to port 0 comes from its ephemeral range, the range
//! it also takes the local port of every outgoing connection from. Between choosing such a
//! port (bound, then released for the child) and the child binding it, any connection made on
//! the machine may take it, and the child fails with "address already in use". So ports are
//! chosen outside that range (below it, or above it when there is no room below), where the
//! system never picks one by itself: at random, and none handed out twice by one process
//! (until it has handed out half of the ports it chooses from).
//!
//! A port is taken as free when a connection to it is refused. It is not checked by binding
//! it: a socket bound (and listening) in this process, however briefly, is copied into any
//! child another thread forks meanwhile and lives there until the child's `exec`. That copy
//! accepted the connections meant for the process the port was chosen for, or kept it from
//! binding the port (a test saw both, several times in a few hundred runs, with two tests
//! starting servers at once). A connection's own socket takes a port from the ephemeral
//! range, never the one chosen.
//!
//! Where neither side leaves room, or the range is unknown (outside Linux), the system
//! chooses, as before (by binding port 0).

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

/// The lowest port chosen.
const LOWEST: u16 = 10_000;

/// Fewer ports than this between [`LOWEST`] and the ephemeral range: choose above it, or let
/// the system choose.
const ENOUGH: u16 = 2_000;

/// Ports this process has handed out.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The system's ephemeral port range, where it can be read (Linux).
fn ephemeral_range() -> Option<(u16, u16)> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// Where to choose from: below the ephemeral range, or above it; `None` when neither leaves
/// [`ENOUGH`] ports.
fn choice_range((lo, hi): (u16, u16)) -> Option<(u16, u16)> {
    if lo >= LOWEST.saturating_add(ENOUGH) {
        Some((LOWEST, lo - 1))
    } else if u16::MAX - hi >= ENOUGH {
        Some((hi + 1, u16::MAX))
    } else {
        None
    }
}

/// Whether nothing listens on `127.0.0.1:port` (nor on any address): a connection to it is
/// refused. Anything else (accepted, timed out, another error) counts as taken.
fn refused(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// `n` distinct free ports on 127.0.0.1, outside the system's ephemeral range (see the
/// module's doc): each one a connection to which is refused.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let Some((from, to)) = ephemeral_range().and_then(choice_range) else {
        return system_ports(n);
    };
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    // A long-lived process forgets its choices once half of the ports are handed out.
    if given.len() + n > usize::from(to - from) / 2 {
        given.clear();
    }
    let mut ports = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        if tries > 100 * n + 1_000 {
            tracing::warn!(
                from,
                to,
                "no free loopback port found outside the ephemeral range; the system chooses"
            );
            return system_ports(n);
        }
        let port = rand::random_range(from..=to);
        if given.contains(&port) {
            continue;
        }
        if refused(port) {
            given.insert(port);
            ports.push(port);
        }
    }
    Ok(ports)
}

/// `n` distinct ports the system chooses (its ephemeral range).
fn system_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_outside_the_ephemeral_range_and_are_never_given_twice() {
        let range = ephemeral_range();
        let mut seen = HashSet::new();
        for _ in 0..50 {
            for p in free_ports(6).unwrap() {
                assert!(seen.insert(p), "port {p} handed out twice");
                if let Some((lo, hi)) = range.filter(|r| choice_range(*r).is_some()) {
                    assert!(!(lo..=hi).contains(&p), "{p} is in {lo}-{hi}");
                }
                // Free to bind.
                TcpListener::bind(("127.0.0.1", p)).unwrap();
            }
        }
    }

    #[test]
    fn a_port_something_listens_on_is_taken_and_free_once_it_stops() {
        // A port the system never hands out by itself: one from the system's choice (port 0)
        // could be given to another test's listener between the drop and the check.
        let port = free_ports(1).unwrap()[0];
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        assert!(!refused(port));
        drop(listener);
        assert!(refused(port));
    }

    #[test]
    fn the_choice_avoids_the_ephemeral_range_or_leaves_it_to_the_system() {
        assert_eq!(choice_range((32_768, 60_999)), Some((10_000, 32_767)));
        assert_eq!(choice_range((1_024, 60_000)), Some((60_001, 65_535)));
        assert_eq!(choice_range((1_024, 65_000)), None);
    }
}
