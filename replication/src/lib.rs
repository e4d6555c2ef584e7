//! Cross-region replication, store-side: the change feed's record format, which keys
//! replicate, each region's role and epoch, the standby's cursor, applying a shipped batch
//! idempotently in one transaction with its cursor, the shipped audit log (checked against
//! its signed checkpoints as it arrives) and the divergence of a deposed primary.
//!
//! The transport (gRPC with mTLS) and the loops that drive this live in `arca-node`.
//!
//! Keyspace (tuple-encoded):
//!
//! | key | value |
//! | --- | --- |
//! | `("changes",<versionstamp>)` | a [`ChangeRecord`]: one request's mutations, in commit order |
//! | `("region","state")` | this region's [`RegionState`] (JSON; never replicated) |
//! | `("region","cursor",<source>)` | the standby's [`Cursor`] in `source`'s feed (JSON) |
//! | `("region","divergence",<n>)` | a divergence report (JSON) |
//! | `("region","shipped",<standby>)` | on a primary: the feed position `standby` confirmed |
//! | `("replica",<source>,"e",<index>)` | `source`'s audit entry at leaf `index` |
//! | `("replica",<source>,"cp",<size>)` | `source`'s signed checkpoint of that size |
//! | `("replica",<source>,"state")` | the shipped log's size and right edge (JSON) |
//!
//! Only keys under `("kv",…)` and `("sys",…)` replicate ([`replicated`]); a batch that
//! names any other key is refused, so a peer cannot overwrite a region's role, cursors or
//! audit log.

#![forbid(unsafe_code)]

pub mod apply;
pub mod change;
pub mod region;

pub use apply::{
    AppliedBatch, ApplyError, AuditShipment, Batch, ShippedChange, apply_batch, apply_snapshot_chunk,
};
pub use change::{ChangeRecord, Op};
pub use region::{Cursor, RegionState, Role};

use arca_store::tuple::{Element, pack};

/// The change feed's prefix; records are at `prefix ‖ versionstamp`.
pub fn changes() -> Vec<u8> {
    pack(&["changes".into()])
}

pub fn region_state() -> Vec<u8> {
    pack(&["region".into(), "state".into()])
}

pub fn region_cursor(source: &str) -> Vec<u8> {
    pack(&["region".into(), "cursor".into(), source.into()])
}

/// On a primary: the feed position `standby` has confirmed (its last pull's cursor).
pub fn region_shipped(standby: &str) -> Vec<u8> {
    pack(&["region".into(), "shipped".into(), standby.into()])
}

pub fn divergences() -> Vec<u8> {
    pack(&["region".into(), "divergence".into()])
}

pub fn divergence(n: u64) -> Vec<u8> {
    pack(&["region".into(), "divergence".into(), n.into()])
}

pub fn replica_entry(source: &str, index: u64) -> Vec<u8> {
    pack(&["replica".into(), source.into(), "e".into(), index.into()])
}

pub fn replica_checkpoint(source: &str, size: u64) -> Vec<u8> {
    pack(&["replica".into(), source.into(), "cp".into(), size.into()])
}

pub fn replica_state(source: &str) -> Vec<u8> {
    pack(&["replica".into(), source.into(), "state".into()])
}

/// The replicated keyspace as `[begin, end)` ranges, in key order: secrets (`kv`) and the
/// system state (`sys`: keyring, seal, tokens, policies, roles, mounts) except each
/// region's own audit signing key (`("sys","audit-key",…)`), which never leaves its region.
pub fn replicated_ranges() -> Vec<(Vec<u8>, Vec<u8>)> {
    let kv = pack(&[Element::from("kv")]);
    let sys = pack(&[Element::from("sys")]);
    let audit_key = pack(&["sys".into(), "audit-key".into()]);
    let end = |p: &[u8]| arca_store::prefix_end(p).expect("a tuple prefix has an end");
    vec![(kv.clone(), end(&kv)), (sys.clone(), audit_key.clone()), (end(&audit_key), end(&sys))]
}

/// Whether `key` belongs to the replicated keyspace ([`replicated_ranges`]).
pub fn replicated(key: &[u8]) -> bool {
    thread_local! {
        static RANGES: Vec<(Vec<u8>, Vec<u8>)> = replicated_ranges();
    }
    RANGES.with(|r| r.iter().any(|(b, e)| key >= b.as_slice() && key < e.as_slice()))
}

/// Whether a whole range `[begin, end)` lies inside one replicated range.
pub fn replicated_range(begin: &[u8], end: &[u8]) -> bool {
    replicated_ranges().iter().any(|(b, e)| begin >= b.as_slice() && end <= e.as_slice() && end > begin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kv_and_sys_replicate() {
        assert!(replicated(&pack(&["kv".into(), "secret".into(), "m".into(), "a".into()])));
        assert!(replicated(&pack(&["sys".into(), "keyring".into()])));
        assert!(!replicated(&region_state()));
        assert!(!replicated(&pack(&["audit".into(), "r".into(), "e".into()])));
        assert!(!replicated(&pack(&["kvx".into()])));
        assert!(!replicated(&changes()));
        let kv = pack(&["kv".into()]);
        let end = arca_store::prefix_end(&kv).unwrap();
        assert!(replicated_range(&kv, &end));
        assert!(!replicated_range(&kv, &region_state()));
        let own_key = pack(&["sys".into(), "audit-key".into(), "eu".into()]);
        assert!(!replicated(&own_key), "a region's audit signing key must stay home");
        assert!(replicated(&pack(&[
            "sys".into(),
            "token".into(),
            arca_store::tuple::Element::Bytes(vec![1])
        ])));
    }
}
