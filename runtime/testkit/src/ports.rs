//! Free loopback ports for the servers a test starts (PostgreSQL, the ledger, the sidecar, the
//! control plane).
//!
//! A port found by binding port 0 and closing the socket comes from the kernel's ephemeral
//! range, the range every outgoing connection also takes its local port from. Between the
//! close and the server's own bind, a connection opened by another test (to PostgreSQL, to a
//! ledger) may take it, and the server fails to start: seen in CI on 2026-11-27. The kernel
//! never hands out a port below that range on its own, so ports are chosen there: only another
//! listener could take one, and each is checked bindable first.

use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: clear of the well-known and most registered services' ports.
const LOWEST: u16 = 10_000;

/// Linux's default first ephemeral port, when the kernel's setting cannot be read.
const DEFAULT_FIRST_EPHEMERAL: u16 = 32_768;

/// A loopback TCP port that nothing listens on now and that the kernel will not give an
/// outgoing connection: below the ephemeral range when there is room (see the module's note),
/// else one the kernel chooses.
///
/// # Panics
/// When no port can be bound (the test cannot run anyway).
pub fn free_port() -> u16 {
    let end = first_ephemeral_port();
    if end > LOWEST {
        let span = u32::from(end - LOWEST);
        let candidates = (0..span)
            .map(|_| LOWEST + u16::try_from(next_candidate() % span).expect("span fits u16"));
        if let Some(port) = first_bindable(candidates) {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback port")
}

/// The first of `candidates` that nothing listens on.
fn first_bindable(mut candidates: impl Iterator<Item = u16>) -> Option<u16> {
    candidates.find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn first_ephemeral_port() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_FIRST_EPHEMERAL)
}

/// Successive candidates, from a start that differs between processes, so test binaries run
/// side by side do not walk the same ports.
fn next_candidate() -> u32 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        AtomicU32::new(std::process::id().wrapping_mul(7_919) ^ nanos)
    })
    .fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range_and_are_not_repeated() {
        let end = first_ephemeral_port();
        assert!(
            end > LOWEST,
            "this machine's ephemeral range starts at {end}"
        );
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        for port in &ports {
            assert!(
                (LOWEST..end).contains(port),
                "{port} is outside {LOWEST}..{end}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }

    #[test]
    fn a_port_a_server_listens_on_is_not_handed_out() {
        let listener = TcpListener::bind(("127.0.0.1", free_port())).unwrap();
        let held = listener.local_addr().unwrap().port();
        let free = free_port();
        assert_ne!(free, held);
        assert_eq!(first_bindable([held, free].into_iter()), Some(free));
        assert_eq!(first_bindable([held].into_iter()), None);
    }
}
