//! Applying a shipped batch on a standby: idempotent, all-or-nothing, with its cursor.

use arca_audit::merkle::{self, Frontier, Hash};
use arca_store::{StoreError, Transaction};
use serde::{Deserialize, Serialize};

use crate::change::{ChangeRecord, Op};
use crate::region::{Cursor, RegionState, Role};
use crate::{
    region_cursor, region_state, replica_checkpoint, replica_entry, replica_state, replicated,
    replicated_range,
};

/// One change record as shipped: its versionstamp in the source's feed and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedChange {
    pub stamp: Vec<u8>,
    pub record: Vec<u8>,
}

/// A slice of the source's audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditShipment {
    /// Leaf index of `entries[0]`.
    pub first_index: u64,
    pub entries: Vec<Vec<u8>>,
    /// Signed checkpoints whose sizes fall within what this shipment completes.
    pub checkpoints: Vec<(u64, String)>,
    /// The versionstamp of the last entry in the source's event queue (where the next
    /// shipment starts).
    pub last_stamp: Option<Vec<u8>>,
}

/// What a standby receives from its primary in one pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub source: String,
    /// The source's epoch when it answered.
    pub epoch: u64,
    pub changes: Vec<ShippedChange>,
    pub audit: AuditShipment,
}

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedBatch {
    pub changes: u64,
    pub entries: u64,
    pub cursor: Cursor,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this region is not a standby (it is {0:?}): nothing is applied")]
    NotStandby(Role),
    #[error("the source's epoch {theirs} is older than this region's {ours}: it was deposed")]
    StaleSource { theirs: u64, ours: u64 },
    #[error("a shipped change names a key outside the replicated keyspace")]
    Forbidden,
    #[error("a shipped change record is malformed: {0}")]
    Malformed(String),
    #[error("the shipped audit log has a gap: expected leaf {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("the shipped audit log does not match the source's signed checkpoint at size {0}")]
    RootMismatch(u64),
    #[error("the region state is unreadable")]
    Corrupt,
}

impl arca_store::TxnError for ApplyError {
    fn as_store_error(&self) -> Option<&StoreError> {
        match self {
            ApplyError::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// The shipped log's right edge on this standby.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReplicaLog {
    size: u64,
    frontier: Vec<String>,
}

pub fn load_state(tx: &mut dyn Transaction) -> Result<Option<RegionState>, ApplyError> {
    match tx.get(&region_state())? {
        None => Ok(None),
        Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(|_| ApplyError::Corrupt),
    }
}

pub fn store_state(tx: &mut dyn Transaction, state: &RegionState) -> Result<(), StoreError> {
    tx.set(&region_state(), &serde_json::to_vec(state).expect("region state serializes"))
}

pub fn load_cursor(tx: &mut dyn Transaction, source: &str) -> Result<Cursor, ApplyError> {
    match tx.get(&region_cursor(source))? {
        None => Ok(Cursor::default()),
        Some(raw) => serde_json::from_slice(&raw).map_err(|_| ApplyError::Corrupt),
    }
}

pub fn store_cursor(tx: &mut dyn Transaction, source: &str, cursor: &Cursor) -> Result<(), StoreError> {
    tx.set(&region_cursor(source), &serde_json::to_vec(cursor).expect("cursor serializes"))
}

/// Applies one mutation of the replicated keyspace.
pub fn apply_op(tx: &mut dyn Transaction, op: &Op) -> Result<(), ApplyError> {
    match op {
        Op::Set { key, value } if replicated(key) => tx.set(key, value)?,
        Op::Clear { key } if replicated(key) => tx.clear(key)?,
        Op::ClearRange { begin, end } if replicated_range(begin, end) => tx.clear_range(begin, end)?,
        _ => return Err(ApplyError::Forbidden),
    }
    Ok(())
}

/// Applies `batch` in `tx`, with the cursor, only if this region is a standby of an epoch
/// no newer than the batch's. Changes and entries at or before the cursor are skipped, so
/// re-applying a batch (after a lost reply, say) changes nothing.
pub fn apply_batch(
    tx: &mut dyn Transaction,
    batch: &Batch,
    now_unix_ms: u64,
) -> Result<AppliedBatch, ApplyError> {
    let state = load_state(tx)?.ok_or(ApplyError::Corrupt)?;
    if state.role != Role::Standby {
        return Err(ApplyError::NotStandby(state.role));
    }
    if batch.epoch < state.epoch {
        return Err(ApplyError::StaleSource { theirs: batch.epoch, ours: state.epoch });
    }
    let mut cursor = load_cursor(tx, &batch.source)?;
    let after = cursor.stamp_bytes();
    let mut applied = AppliedBatch::default();
    for change in &batch.changes {
        if after.as_deref().is_some_and(|a| change.stamp.as_slice() <= a) {
            continue;
        }
        if change.stamp.len() != 12 {
            return Err(ApplyError::Malformed("a versionstamp is not 12 bytes".into()));
        }
        let record =
            ChangeRecord::decode(&change.record).map_err(|e| ApplyError::Malformed(e.to_string()))?;
        for op in &record.ops {
            apply_op(tx, op)?;
        }
        cursor.stamp = Some(hex::encode(&change.stamp));
        cursor.source_time_unix_ms = record.time_unix_ms;
        applied.changes += 1;
    }
    applied.entries = apply_audit(tx, &batch.source, &batch.audit, &mut cursor)?;
    cursor.epoch = batch.epoch;
    cursor.applied_unix_ms = now_unix_ms;
    store_cursor(tx, &batch.source, &cursor)?;
    applied.cursor = cursor;
    Ok(applied)
}

/// Applies one chunk of a snapshot (pairs in key order). The first chunk (no
/// `snapshot_after` yet) first clears this region's replicated keyspace and sets the feed
/// position the copy starts from; the last one marks the cursor seeded. Pairs outside the
/// replicated keyspace are refused.
pub fn apply_snapshot_chunk(
    tx: &mut dyn Transaction,
    source: &str,
    pairs: &[(Vec<u8>, Vec<u8>)],
    feed_stamp: Option<&[u8]>,
    done: bool,
    now_unix_ms: u64,
) -> Result<Cursor, ApplyError> {
    let state = load_state(tx)?.ok_or(ApplyError::Corrupt)?;
    if state.role != Role::Standby {
        return Err(ApplyError::NotStandby(state.role));
    }
    let mut cursor = load_cursor(tx, source)?;
    if cursor.snapshot_after.is_none() {
        for (begin, end) in crate::replicated_ranges() {
            tx.clear_range(&begin, &end)?;
        }
        cursor = Cursor { stamp: feed_stamp.filter(|s| !s.is_empty()).map(hex::encode), ..Cursor::default() };
        cursor.snapshot_after = Some(String::new());
    }
    for (key, value) in pairs {
        if !replicated(key) {
            return Err(ApplyError::Forbidden);
        }
        tx.set(key, value)?;
    }
    if let Some((last, _)) = pairs.last() {
        cursor.snapshot_after = Some(hex::encode(last));
    }
    if done {
        cursor.seeded = true;
        cursor.snapshot_after = None;
    }
    cursor.applied_unix_ms = now_unix_ms;
    store_cursor(tx, source, &cursor)?;
    Ok(cursor)
}

fn apply_audit(
    tx: &mut dyn Transaction,
    source: &str,
    audit: &AuditShipment,
    cursor: &mut Cursor,
) -> Result<u64, ApplyError> {
    let skip = cursor.audit_next.saturating_sub(audit.first_index) as usize;
    let fresh = audit.entries.get(skip..).unwrap_or_default();
    if fresh.is_empty() && audit.checkpoints.is_empty() {
        return Ok(0);
    }
    let first = audit.first_index + skip as u64;
    if !fresh.is_empty() && first != cursor.audit_next {
        return Err(ApplyError::Gap { expected: cursor.audit_next, got: first });
    }
    let mut log: ReplicaLog = match tx.get(&replica_state(source))? {
        None => ReplicaLog::default(),
        Some(raw) => serde_json::from_slice(&raw).map_err(|_| ApplyError::Corrupt)?,
    };
    let hashes: Result<Vec<Hash>, _> = log
        .frontier
        .iter()
        .map(|h| hex::decode(h).ok().and_then(|b| b.try_into().ok()).ok_or(ApplyError::Corrupt))
        .collect();
    let mut frontier = Frontier::from_parts(log.size, hashes?).ok_or(ApplyError::Corrupt)?;
    if frontier.size() != cursor.audit_next {
        return Err(ApplyError::Corrupt);
    }
    let start = frontier.size();
    let mut checkpoints = audit.checkpoints.iter().filter(|(size, _)| *size > start).peekable();
    let check =
        |frontier: &Frontier, size: u64, note: &str, tx: &mut dyn Transaction| -> Result<(), ApplyError> {
            let text = arca_audit::note::unverified_text(note).ok_or(ApplyError::RootMismatch(size))?;
            let cp = arca_audit::checkpoint::Checkpoint::parse(text)
                .map_err(|_| ApplyError::RootMismatch(size))?;
            if cp.size != size || cp.root != frontier.root() {
                return Err(ApplyError::RootMismatch(size));
            }
            tx.set(&replica_checkpoint(source, size), note.as_bytes())?;
            Ok(())
        };
    for entry in fresh {
        tx.set(&replica_entry(source, frontier.size()), entry)?;
        frontier.push(merkle::leaf_hash(entry));
        while let Some((size, note)) = checkpoints.peek() {
            if *size > frontier.size() {
                break;
            }
            if *size == frontier.size() {
                check(&frontier, *size, note, tx)?;
            }
            checkpoints.next();
        }
    }
    log.size = frontier.size();
    log.frontier = frontier.hashes().iter().map(hex::encode).collect();
    tx.set(&replica_state(source), &serde_json::to_vec(&log).expect("log state serializes"))?;
    cursor.audit_next = frontier.size();
    if let Some(stamp) = &audit.last_stamp {
        cursor.audit_stamp = Some(hex::encode(stamp));
    }
    Ok(fresh.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_store::tuple::pack;
    use arca_store::{SqliteConfig, SqliteStore, StoreExt};

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        (dir, s)
    }

    fn standby(s: &SqliteStore, epoch: u64) {
        s.transact(|tx| store_state(tx, &RegionState::new(Role::Standby, epoch, "p", 0))).unwrap();
    }

    fn key(name: &str) -> Vec<u8> {
        pack(&["kv".into(), "secret".into(), name.into()])
    }

    fn change(n: u8, ops: Vec<Op>) -> ShippedChange {
        let mut stamp = vec![0u8; 12];
        stamp[9] = n;
        ShippedChange {
            stamp,
            record: ChangeRecord { event_order: 0, time_unix_ms: 1000 + n as u64, ops }.encode(),
        }
    }

    fn apply(s: &SqliteStore, batch: &Batch) -> Result<AppliedBatch, ApplyError> {
        s.transact(|tx| apply_batch(tx, batch, 5)).map(|c| c.value)
    }

    fn get(s: &SqliteStore, k: &[u8]) -> Option<Vec<u8>> {
        s.transact(|tx| tx.get(k)).unwrap().value
    }

    #[test]
    fn applies_once_with_the_cursor() {
        let (_d, s) = store();
        standby(&s, 1);
        let batch = Batch {
            source: "p".into(),
            epoch: 1,
            changes: vec![
                change(1, vec![Op::Set { key: key("a"), value: b"1".to_vec() }]),
                change(2, vec![Op::Set { key: key("b"), value: b"2".to_vec() }, Op::Clear { key: key("a") }]),
            ],
            audit: AuditShipment::default(),
        };
        let done = apply(&s, &batch).unwrap();
        assert_eq!(done.changes, 2);
        assert_eq!(get(&s, &key("a")), None);
        assert_eq!(get(&s, &key("b")), Some(b"2".to_vec()));
        assert_eq!(done.cursor.source_time_unix_ms, 1002);
        // Again: nothing changes (the cursor skips both).
        s.transact(|tx| tx.set(&key("a"), b"local")).unwrap();
        assert_eq!(apply(&s, &batch).unwrap().changes, 0);
        assert_eq!(get(&s, &key("a")), Some(b"local".to_vec()));
    }

    #[test]
    fn refuses_foreign_keys_stale_sources_and_non_standbys_atomically() {
        let (_d, s) = store();
        standby(&s, 3);
        let evil = Batch {
            source: "p".into(),
            epoch: 3,
            changes: vec![
                change(1, vec![Op::Set { key: key("a"), value: b"1".to_vec() }]),
                change(2, vec![Op::Set { key: crate::region_state(), value: b"{}".to_vec() }]),
            ],
            audit: AuditShipment::default(),
        };
        assert!(matches!(apply(&s, &evil), Err(ApplyError::Forbidden)));
        assert_eq!(get(&s, &key("a")), None, "half a batch was applied");
        let stale = Batch { epoch: 2, changes: vec![change(1, vec![])], ..evil.clone() };
        assert!(matches!(apply(&s, &stale), Err(ApplyError::StaleSource { theirs: 2, ours: 3 })));
        s.transact(|tx| store_state(tx, &RegionState::new(Role::Primary, 4, "me", 0))).unwrap();
        let ok = Batch { epoch: 4, changes: vec![change(1, vec![])], ..evil };
        assert!(matches!(apply(&s, &ok), Err(ApplyError::NotStandby(Role::Primary))));
    }

    #[test]
    fn the_shipped_log_is_checked_against_its_checkpoints() {
        let (_d, s) = store();
        standby(&s, 1);
        let signer = arca_audit::note::NoteSigner::from_seed("arca/c/p", &[1; 32]).unwrap();
        let entries: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        let mut f = Frontier::new();
        for e in &entries[..4] {
            f.push(merkle::leaf_hash(e));
        }
        let cp = arca_audit::checkpoint::Checkpoint {
            origin: "arca/c/p".into(),
            size: 4,
            root: f.root(),
            extensions: vec![],
        };
        let note = cp.sign(&signer).unwrap();
        let batch = |first: u64, es: &[Vec<u8>], cps: Vec<(u64, String)>| Batch {
            source: "p".into(),
            epoch: 1,
            changes: vec![],
            audit: AuditShipment {
                first_index: first,
                entries: es.to_vec(),
                checkpoints: cps,
                last_stamp: None,
            },
        };
        let done = apply(&s, &batch(0, &entries[..3], vec![])).unwrap();
        assert_eq!((done.entries, done.cursor.audit_next), (3, 3));
        // Overlapping resend plus the rest: only the new ones count.
        let done = apply(&s, &batch(1, &entries[1..5], vec![(4, note.clone())])).unwrap();
        assert_eq!((done.entries, done.cursor.audit_next), (2, 5));
        assert_eq!(get(&s, &replica_checkpoint("p", 4)), Some(note.clone().into_bytes()));
        // A gap, and a tampered entry, are refused.
        assert!(matches!(
            apply(&s, &batch(7, &entries[..1], vec![])),
            Err(ApplyError::Gap { expected: 5, got: 7 })
        ));
        let (_d2, s2) = store();
        standby(&s2, 1);
        let mut forged = entries.clone();
        forged[2] = b"forged".to_vec();
        assert!(matches!(
            apply(&s2, &batch(0, &forged[..4], vec![(4, note)])),
            Err(ApplyError::RootMismatch(4))
        ));
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use arca_store::tuple::pack;
    use arca_store::{SqliteConfig, SqliteStore, StoreExt};

    #[test]
    fn a_snapshot_replaces_the_replicated_keyspace_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        let stale = pack(&["kv".into(), "secret".into(), "stale".into()]);
        let own_key = pack(&["sys".into(), "audit-key".into(), "us".into()]);
        let fresh = pack(&["sys".into(), "keyring".into()]);
        s.transact(|tx| {
            store_state(tx, &RegionState::new(Role::Standby, 1, "eu", 0))?;
            tx.set(&stale, b"old")?;
            tx.set(&own_key, b"mine")
        })
        .unwrap();
        let chunk = |pairs: Vec<(Vec<u8>, Vec<u8>)>, done: bool| {
            s.transact(|tx| apply_snapshot_chunk(tx, "eu", &pairs, Some(&[7u8; 12]), done, 9)).unwrap().value
        };
        let first = chunk(vec![(fresh.clone(), b"ring".to_vec())], false);
        assert!(!first.seeded);
        assert_eq!(first.stamp, Some(hex::encode([7u8; 12])));
        let get = |k: &[u8]| s.transact(|tx| tx.get(k)).unwrap().value;
        assert_eq!(get(&stale), None, "the standby's own replicated data is replaced");
        assert_eq!(get(&own_key), Some(b"mine".to_vec()), "its audit signing key stays");
        let last = chunk(vec![(pack(&["kv".into(), "secret".into(), "z".into()]), b"1".to_vec())], true);
        assert!(last.seeded);
        assert_eq!(last.stamp, Some(hex::encode([7u8; 12])), "later chunks keep the starting feed position");
        assert_eq!(get(&fresh), Some(b"ring".to_vec()));
        let forbidden = s.transact(|tx| {
            apply_snapshot_chunk(tx, "eu", &[(own_key.clone(), b"x".to_vec())], None, true, 9)
        });
        assert!(matches!(forbidden, Err(ApplyError::Forbidden)));
    }
}
