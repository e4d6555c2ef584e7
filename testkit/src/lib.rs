//! `arca-testkit`: loopback ports for the listeners of child processes that tests, the
//! failover drill and chaos runs start.
//!
//! Such a port must be chosen before the process starts (it goes into the process's config
//! and into the proxies in front of it), so it is free when chosen and bound later. The
//! usual trick, binding port 0 and closing the socket, leaves that window open to the
//! kernel: it hands the same port to the next `bind(0)` (another allocation, a proxy's own
//! listener) or uses it as the local port of an outgoing connection (a node connecting to a
//! peer), and the child then fails with "address in use".
//!
//! [`free_port`] closes the window. Its ports lie below the kernel's ephemeral range, which
//! neither `bind(0)` nor `connect` ever picks from, and the process never hands out one port
//! twice. A process starts at its own offset (from its pid), so test binaries or drills
//! running side by side rarely probe the same ports; a port another process holds fails the
//! probe and is skipped.

#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: above the well-known and most registered service ports.
const FLOOR: u32 = 10_000;

/// The kernel's ephemeral range when `/proc` does not say (Linux's default).
const EPHEMERAL_DEFAULT: (u32, u32) = (32_768, 60_999);

/// A loopback TCP port that was free when probed, lies outside the ephemeral range and was
/// not handed out before by this process.
///
/// Falls back to a kernel-chosen port (`bind(0)`) only if the range below the ephemeral
/// ports is exhausted or absent.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, _) = ephemeral_range();
    let window = Window { start: std::process::id().wrapping_mul(7_919), span: low.saturating_sub(FLOOR) };
    let bindable = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    window.take(&NEXT, bindable).unwrap_or_else(|| {
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
    })
}

/// The ports `FLOOR .. FLOOR + span`, walked from `start` (modulo `span`).
struct Window {
    start: u32,
    span: u32,
}

impl Window {
    fn port(&self, n: u32) -> Option<u16> {
        u16::try_from(FLOOR + (self.start % self.span + n) % self.span).ok()
    }

    /// The next port of the walk that is `free`, counting the walk in `next`; `None` once
    /// the window is walked through.
    fn take(&self, next: &AtomicU32, free: impl Fn(u16) -> bool) -> Option<u16> {
        if self.span == 0 {
            return None;
        }
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            if n >= self.span {
                return None;
            }
            if let Some(port) = self.port(n).filter(|p| free(*p)) {
                return Some(port);
            }
        }
    }
}

/// The kernel's ephemeral port range, `(first, last)`.
pub fn ephemeral_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_range(&text))
        .unwrap_or(EPHEMERAL_DEFAULT)
}

fn parse_range(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split_whitespace().map(str::parse::<u32>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) if low <= high && high <= 65_535 => Some((low, high)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let port = free_port();
            assert!(seen.insert(port), "port {port} handed out twice");
            assert!(u32::from(port) >= FLOOR && !(low..=high).contains(&u32::from(port)), "port {port}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }

    #[test]
    fn a_taken_port_is_skipped_and_a_walked_window_ends() {
        let next = AtomicU32::new(0);
        let window = Window { start: 12_346, span: 3 };
        assert_eq!([0, 1, 2].map(|n| window.port(n)), [Some(10_001), Some(10_002), Some(10_000)]);
        let free = |port| port != 10_001;
        assert_eq!(window.take(&next, free), Some(10_002));
        assert_eq!(window.take(&next, free), Some(10_000));
        assert_eq!(window.take(&next, free), None);
        assert_eq!(Window { start: 0, span: 0 }.take(&AtomicU32::new(0), |_| true), None);
    }

    #[test]
    fn the_range_parser_is_strict() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32_768, 60_999)));
        for bad in ["", "32768", "60999 32768", "1 70000", "a b", "1 2 3"] {
            assert_eq!(parse_range(bad), None, "{bad:?}");
        }
    }
}
