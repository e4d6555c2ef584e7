//! Shared fixtures for the benchmarks in `benches/` and the `arca-bench` load generator.

use arca_audit::{Actor, Event, Operation, Outcome, Source};

/// A realistic audit event (a read by an AppRole identity), the `i`-th of a run: its time and
/// request id advance with `i` (time-ordered, like the node's request ids).
pub fn sample_event(i: u64) -> Event {
    Event {
        time_unix_ms: 1_764_000_000_000 + i,
        request_id: format!("{:012x}{i:020x}", 1_764_000_000_000u64 + i / 100),
        cluster: "bench".into(),
        region: "local".into(),
        node: "node-a".into(),
        actor: Actor {
            entity: "approle:payments".into(),
            token_accessor: Some("9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d".into()),
        },
        source: Source { address: "10.1.2.3:51234".into(), proxy: None },
        operation: Operation::KvRead,
        path: format!("secret/data/payments/{}", i % 1000),
        secret_version: Some(7),
        outcome: Outcome::Ok,
    }
}
