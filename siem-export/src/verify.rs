//! `arca-siem verify`: proves that what a consumer received on the two topics is the log.
//!
//! For every entry message: the key is the origin, the header repeats the leaf index, the
//! leaf hash is recomputed from the entry bytes, the entry decodes, and the whole OCSF
//! object is recomputed from the entry and compared — so an edit anywhere in a message is
//! named by its index. Then, per origin, the tree is rebuilt from leaf 0 and its root is
//! compared with every signed checkpoint (signature checked against the log's key). Equal
//! roots at every checkpoint size prove the checkpoints consistent with one another; a
//! root that differs is narrowed to the leaves since the previous good checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use arca_audit::Event;
use arca_audit::checkpoint;
use arca_audit::merkle::{self, Frontier, Hash};
use arca_audit::note::NoteVerifier;
use serde::Serialize;

use crate::kafka::Record;
use crate::ocsf;

/// A problem with one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Altered {
    pub index: u64,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

/// A message that cannot even be attributed to a leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Malformed {
    pub topic: &'static str,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

/// A checkpoint that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadCheckpoint {
    pub size: u64,
    pub reason: String,
    /// When the root differs: the leaves since the last checkpoint that matched.
    pub suspect_from: Option<u64>,
}

/// The verdict on one log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LogReport {
    pub origin: String,
    /// Distinct leaves received.
    pub entries: u64,
    /// Messages received for a leaf already received with the same content (harmless).
    pub duplicates: u64,
    pub checkpoints_verified: u64,
    /// The largest checkpoint size whose root matched.
    pub verified_size: u64,
    /// The largest signed size seen.
    pub signed_size: u64,
    /// Leaf indexes below the signed size that no message carried, as `[first, last]` ranges.
    pub missing: Vec<(u64, u64)>,
    /// Leaves received twice with different content.
    pub conflicting: Vec<u64>,
    pub altered: Vec<Altered>,
    pub bad_checkpoints: Vec<BadCheckpoint>,
}

impl LogReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.conflicting.is_empty()
            && self.altered.is_empty()
            && self.bad_checkpoints.is_empty()
            && self.checkpoints_verified > 0
            && self.verified_size == self.signed_size
    }
}

/// The verdict on everything read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub logs: Vec<LogReport>,
    pub malformed: Vec<Malformed>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.malformed.is_empty() && !self.logs.is_empty() && self.logs.iter().all(LogReport::ok)
    }

    /// A human summary, one line per finding.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for m in &self.malformed {
            out += &format!(
                "malformed {} message at partition {} offset {}: {}\n",
                m.topic, m.partition, m.offset, m.reason
            );
        }
        for log in &self.logs {
            out += &format!(
                "{}: {} entries ({} duplicates dropped), {} checkpoints verified, verified to size {} of {}\n",
                log.origin,
                log.entries,
                log.duplicates,
                log.checkpoints_verified,
                log.verified_size,
                log.signed_size
            );
            for (a, b) in &log.missing {
                if a == b {
                    out += &format!("  missing: index {a}\n");
                } else {
                    out += &format!("  missing: indexes {a}..={b}\n");
                }
            }
            for i in &log.conflicting {
                out += &format!("  duplicated with different content: index {i}\n");
            }
            for a in &log.altered {
                out += &format!(
                    "  altered: index {} (partition {} offset {}): {}\n",
                    a.index, a.partition, a.offset, a.reason
                );
            }
            for c in &log.bad_checkpoints {
                match c.suspect_from {
                    Some(from) => {
                        out += &format!(
                            "  checkpoint {}: {} (an entry in {}..{} differs)\n",
                            c.size, c.reason, from, c.size
                        )
                    }
                    None => out += &format!("  checkpoint {}: {}\n", c.size, c.reason),
                }
            }
        }
        if self.logs.is_empty() {
            out += "no log found in the topics\n";
        }
        out += if self.ok() { "verify: OK\n" } else { "verify: FAILED\n" };
        out
    }
}

#[derive(Default)]
struct LogState {
    /// index → entry bytes (the first valid message's).
    leaves: BTreeMap<u64, Vec<u8>>,
    duplicates: u64,
    conflicting: BTreeSet<u64>,
    altered: Vec<Altered>,
    /// size → checkpoint note(s) received.
    checkpoints: BTreeMap<u64, BTreeSet<String>>,
}

/// An intact entry message: origin, leaf index, entry bytes.
type Intact = (String, u64, Vec<u8>);
/// A rejected one: the leaf it claims to be (when it says), and why.
type Rejected = (Option<(String, u64)>, String);

/// Checks one entry message.
fn check_entry(r: &Record) -> Result<Intact, Rejected> {
    let value = ocsf::parse(&r.payload).map_err(|e| (None, e.to_string()))?;
    let env = ocsf::envelope(&value).map_err(|e| (None, e.to_string()))?;
    let at = Some((env.origin.clone(), env.index));
    let fail = |reason: String| Err((at.clone(), reason));
    if r.key.as_deref() != Some(env.origin.as_bytes()) {
        return fail("the message key is not the log's origin".into());
    }
    if r.leaf_index_header.as_deref() != Some(env.index.to_string().as_str()) {
        return fail("the leaf-index header does not match arca.leaf_index".into());
    }
    if hex::encode(merkle::leaf_hash(&env.entry)) != env.leaf_hash {
        return fail("arca.leaf_hash is not the hash of arca.entry".into());
    }
    let event = match Event::decode(&env.entry) {
        Ok(e) => e,
        Err(e) => return fail(format!("arca.entry does not decode: {e}")),
    };
    let expected = ocsf::to_ocsf(&env.origin, env.index, &env.entry, &event);
    if expected != value {
        let fields = differing_fields(&expected, &value);
        return fail(format!("OCSF fields differ from the entry: {}", fields.join(", ")));
    }
    Ok((env.origin, env.index, env.entry))
}

/// Top-level (and `arca.*`) field names whose values differ.
fn differing_fields(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec!["(not an object)".into()] };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| k.to_string()).collect()
}

/// Verifies the consumed messages of both topics against the logs' verifier keys.
pub fn verify(entries: &[Record], checkpoints: &[Record], verifiers: &[NoteVerifier]) -> Report {
    let mut logs: BTreeMap<String, LogState> = BTreeMap::new();
    let mut malformed = Vec::new();
    for r in entries {
        match check_entry(r) {
            Ok((origin, index, entry)) => {
                let log = logs.entry(origin).or_default();
                match log.leaves.get(&index) {
                    None => {
                        log.leaves.insert(index, entry);
                    }
                    Some(existing) if *existing == entry => log.duplicates += 1,
                    Some(_) => {
                        log.conflicting.insert(index);
                    }
                }
            }
            Err((Some((origin, index)), reason)) => {
                logs.entry(origin).or_default().altered.push(Altered {
                    index,
                    partition: r.partition,
                    offset: r.offset,
                    reason,
                });
            }
            Err((None, reason)) => malformed.push(Malformed {
                topic: "entries",
                partition: r.partition,
                offset: r.offset,
                reason,
            }),
        }
    }
    for r in checkpoints {
        let Ok(text) = std::str::from_utf8(&r.payload) else {
            malformed.push(Malformed {
                topic: "checkpoints",
                partition: r.partition,
                offset: r.offset,
                reason: "not UTF-8".into(),
            });
            continue;
        };
        let body = arca_audit::note::unverified_text(text).unwrap_or(text);
        match checkpoint::Checkpoint::parse(body) {
            Ok(cp) => {
                logs.entry(cp.origin)
                    .or_default()
                    .checkpoints
                    .entry(cp.size)
                    .or_default()
                    .insert(text.to_owned());
            }
            Err(e) => malformed.push(Malformed {
                topic: "checkpoints",
                partition: r.partition,
                offset: r.offset,
                reason: format!("not a checkpoint: {e}"),
            }),
        }
    }
    let logs = logs.into_iter().map(|(origin, state)| verify_log(origin, state, verifiers)).collect();
    Report { logs, malformed }
}

fn verify_log(origin: String, state: LogState, verifiers: &[NoteVerifier]) -> LogReport {
    let mut report = LogReport {
        origin: origin.clone(),
        entries: state.leaves.len() as u64,
        duplicates: state.duplicates,
        conflicting: state.conflicting.into_iter().collect(),
        ..LogReport::default()
    };
    let altered_indexes: BTreeSet<u64> = state.altered.iter().map(|a| a.index).collect();
    report.altered = state.altered;
    let verifier = verifiers.iter().find(|v| v.name() == origin);
    // Checkpoints: signature first.
    let mut signed: BTreeMap<u64, Hash> = BTreeMap::new();
    for (size, notes) in &state.checkpoints {
        let mut roots = BTreeSet::new();
        for note in notes {
            let Some(v) = verifier else {
                report.bad_checkpoints.push(BadCheckpoint {
                    size: *size,
                    reason: "no verifier key for this origin".into(),
                    suspect_from: None,
                });
                continue;
            };
            match checkpoint::open(note, v) {
                Ok(cp) => {
                    roots.insert(*cp.root());
                }
                Err(e) => report.bad_checkpoints.push(BadCheckpoint {
                    size: *size,
                    reason: format!("signature does not verify: {e}"),
                    suspect_from: None,
                }),
            }
        }
        match roots.len() {
            0 => {}
            1 => {
                signed.insert(*size, *roots.iter().next().expect("one root"));
            }
            _ => report.bad_checkpoints.push(BadCheckpoint {
                size: *size,
                reason: "two validly signed checkpoints of this size have different roots: the log forked"
                    .into(),
                suspect_from: None,
            }),
        }
    }
    report.signed_size = signed.keys().next_back().copied().unwrap_or(0);
    // Missing leaves below the signed size (altered ones are reported as altered), as ranges
    // between the indexes received: a message's index is the sender's word, so the work is
    // per message received, never per index claimed (an index near 2^64 costs nothing).
    let limit =
        u128::from(report.signed_size).max(state.leaves.keys().next_back().map_or(0, |i| u128::from(*i) + 1));
    let mut present: Vec<u64> = state.leaves.keys().chain(&altered_indexes).copied().collect();
    present.sort_unstable();
    let mut next = 0u128;
    for i in present.into_iter().map(u128::from).take_while(|i| *i < limit) {
        if i > next {
            report.missing.push((narrow_index(next), narrow_index(i - 1)));
        }
        next = next.max(i + 1);
    }
    if next < limit {
        report.missing.push((narrow_index(next), narrow_index(limit - 1)));
    }
    // Rebuild the tree and match every checkpoint it reaches.
    let mut frontier = Frontier::new();
    let mut last_good = 0u64;
    let mut checks = signed.iter().peekable();
    while let Some((size, _)) = checks.peek() {
        if **size == 0 {
            checks.next();
            continue;
        }
        break;
    }
    for (index, entry) in &state.leaves {
        if *index != frontier.size() {
            break; // a gap: nothing further can be checked
        }
        frontier.push(merkle::leaf_hash(entry));
        while let Some((size, root)) = checks.peek() {
            if **size != frontier.size() {
                break;
            }
            if frontier.root() == **root {
                report.checkpoints_verified += 1;
                report.verified_size = **size;
                last_good = **size;
            } else {
                report.bad_checkpoints.push(BadCheckpoint {
                    size: **size,
                    reason: "the root of the received entries differs from the signed root".into(),
                    suspect_from: Some(last_good),
                });
            }
            checks.next();
        }
    }
    if signed.get(&0).is_some_and(|root| *root == merkle::empty_root()) {
        report.checkpoints_verified += 1;
    }
    report
}

/// An index computed in `u128` below a limit of at most `u64::MAX + 1`.
fn narrow_index(i: u128) -> u64 {
    u64::try_from(i).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arca_audit::checkpoint::Checkpoint;
    use arca_audit::note::NoteSigner;
    use arca_audit::{Actor, Operation, Outcome, Source};

    pub(crate) const ORIGIN: &str = "arca/test/r1";

    pub(crate) fn event(i: u64) -> Event {
        Event {
            time_unix_ms: 1_700_000_000_000 + i,
            request_id: format!("{i:016x}"),
            cluster: "test".into(),
            region: "r1".into(),
            node: "n".into(),
            actor: Actor { entity: "approle:web".into(), token_accessor: None },
            source: Source { address: "127.0.0.1:4000".into(), proxy: None },
            operation: Operation::KvRead,
            path: format!("secret/data/s{i}"),
            secret_version: Some(1),
            outcome: Outcome::Ok,
        }
    }

    pub(crate) fn message(index: u64, entry: &[u8]) -> Record {
        let value = ocsf::to_ocsf(ORIGIN, index, entry, &Event::decode(entry).unwrap());
        Record {
            partition: 0,
            offset: index as i64,
            key: Some(ORIGIN.as_bytes().to_vec()),
            leaf_index_header: Some(index.to_string()),
            payload: value.to_string().into_bytes(),
        }
    }

    /// A log of `n` entries with checkpoints at `sizes`.
    pub(crate) fn log(n: u64, sizes: &[u64]) -> (Vec<Record>, Vec<Record>, NoteVerifier) {
        signed_log(n, sizes, 7)
    }

    /// The same, signed with the key of seed `[seed; 32]`.
    pub(crate) fn signed_log(n: u64, sizes: &[u64], seed: u8) -> (Vec<Record>, Vec<Record>, NoteVerifier) {
        let signer = NoteSigner::from_seed(ORIGIN, &[seed; 32]).unwrap();
        let entries: Vec<Vec<u8>> = (0..n).map(|i| event(i).encode()).collect();
        let messages = entries.iter().enumerate().map(|(i, e)| message(i as u64, e)).collect();
        let mut cps = Vec::new();
        for &size in sizes {
            let mut f = Frontier::new();
            for e in &entries[..size as usize] {
                f.push(merkle::leaf_hash(e));
            }
            let cp = Checkpoint { origin: ORIGIN.into(), size, root: f.root(), extensions: vec![] };
            cps.push(Record {
                partition: 0,
                offset: cps.len() as i64,
                key: Some(ORIGIN.as_bytes().to_vec()),
                leaf_index_header: None,
                payload: cp.sign(&signer).unwrap().into_bytes(),
            });
        }
        (messages, cps, signer.verifier())
    }

    #[test]
    fn an_intact_stream_verifies_and_duplicates_are_dropped() {
        let (mut entries, cps, v) = log(40, &[10, 25, 40]);
        entries.push(entries[3].clone());
        let report = verify(&entries, &cps, &[v]);
        assert!(report.ok(), "{}", report.summary());
        assert_eq!(report.logs[0].entries, 40);
        assert_eq!(report.logs[0].duplicates, 1);
        assert_eq!(report.logs[0].checkpoints_verified, 3);
    }

    #[test]
    fn a_dropped_message_is_named() {
        let (mut entries, cps, v) = log(40, &[10, 25, 40]);
        entries.remove(17);
        entries.remove(30);
        let report = verify(&entries, &cps, &[v]);
        assert!(!report.ok());
        assert_eq!(report.logs[0].missing, vec![(17, 17), (31, 31)]);
        assert!(report.summary().contains("missing: index 17"), "{}", report.summary());
    }

    #[test]
    fn a_message_claiming_a_far_index_is_reported_at_once() {
        // Entry messages carry no signature of their own: anyone who can write to the topic
        // can claim any index. The verifier's work must not follow the claim.
        let (mut entries, cps, v) = log(20, &[20]);
        let forged = event(99).encode();
        entries.push(message(u64::MAX, &forged));
        entries.push(message(1 << 60, &forged));
        let report = verify(&entries, &cps, &[v]);
        let log = &report.logs[0];
        assert_eq!(log.checkpoints_verified, 1, "{}", report.summary());
        assert_eq!(log.entries, 22);
        assert_eq!(log.missing, vec![(20, (1 << 60) - 1), ((1 << 60) + 1, u64::MAX - 1)]);
        assert!(!report.ok(), "a claimed index past the log is reported");
    }

    #[test]
    fn an_edited_field_is_named() {
        let (mut entries, cps, v) = log(20, &[20]);
        let mut value: serde_json::Value = serde_json::from_slice(&entries[5].payload).unwrap();
        value["actor"]["user"]["name"] = "someone-else".into();
        entries[5].payload = value.to_string().into_bytes();
        let report = verify(&entries, &cps, &[v]);
        assert!(!report.ok());
        assert_eq!(report.logs[0].altered.len(), 1);
        assert_eq!(report.logs[0].altered[0].index, 5);
        assert!(report.logs[0].altered[0].reason.contains("actor"), "{:?}", report.logs[0].altered);
    }

    #[test]
    fn a_rewritten_entry_with_a_matching_hash_fails_the_root() {
        let (mut entries, cps, v) = log(20, &[8, 20]);
        let mut forged = event(11);
        forged.actor.entity = "root".into();
        entries[11] = message(11, &forged.encode());
        let report = verify(&entries, &cps, &[v]);
        assert!(!report.ok());
        let bad = &report.logs[0].bad_checkpoints;
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].size, bad[0].suspect_from), (20, Some(8)));
    }

    #[test]
    fn conflicting_duplicates_and_bad_signatures_are_reported() {
        let (mut entries, mut cps, v) = log(10, &[10]);
        let mut other = event(4);
        other.path = "secret/data/elsewhere".into();
        entries.push(message(4, &other.encode()));
        let forger = NoteSigner::from_seed(ORIGIN, &[9u8; 32]).unwrap();
        let fake = Checkpoint { origin: ORIGIN.into(), size: 10, root: [0; 32], extensions: vec![] };
        cps.push(Record {
            partition: 0,
            offset: 9,
            key: None,
            leaf_index_header: None,
            payload: fake.sign(&forger).unwrap().into_bytes(),
        });
        let report = verify(&entries, &cps, &[v]);
        assert_eq!(report.logs[0].conflicting, vec![4]);
        assert!(report.logs[0].bad_checkpoints.iter().any(|c| c.reason.contains("signature")));
        assert!(!report.ok());
    }

    #[test]
    fn no_checkpoint_or_no_key_is_not_ok() {
        let (entries, cps, _) = log(5, &[5]);
        assert!(!verify(&entries, &[], &[]).ok());
        assert!(!verify(&entries, &cps, &[]).ok());
        let junk =
            Record { partition: 0, offset: 0, key: None, leaf_index_header: None, payload: b"{".to_vec() };
        let (entries, cps, v) = log(5, &[5]);
        let mut with_junk = entries.clone();
        with_junk.push(junk);
        assert!(!verify(&with_junk, &cps, &[v]).ok());
    }

    proptest::proptest! {
        /// Whatever bytes arrive on the topics — garbage, or a valid message with one byte
        /// changed — verify and watch report, never panic, and a change is never OK.
        #[test]
        fn hostile_messages_never_panic(garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
                                        flip in 0usize..2000, bit in 0u8..8) {
            let (mut entries, cps, v) = log(6, &[6]);
            let mut watcher = crate::watch::Watcher::new(crate::watch::Rules::default());
            let original = entries[2].payload.clone();
            let at = flip % original.len();
            entries[2].payload[at] ^= 1 << bit;
            let report = verify(&entries, &cps, std::slice::from_ref(&v));
            let changed_meaning = serde_json::from_slice::<serde_json::Value>(&entries[2].payload).ok()
                != serde_json::from_slice::<serde_json::Value>(&original).ok();
            if changed_meaning {
                proptest::prop_assert!(!report.ok(), "{}", report.summary());
            }
            let _ = watcher.observe_message(&entries[2].payload);
            entries.push(Record { partition: 0, offset: 99, key: None, leaf_index_header: None, payload: garbage.clone() });
            let cp_garbage = Record { partition: 0, offset: 99, key: None, leaf_index_header: None, payload: garbage.clone() };
            let report = verify(&entries, &[cps[0].clone(), cp_garbage], std::slice::from_ref(&v));
            proptest::prop_assert!(!report.ok());
            let _ = watcher.observe_message(&garbage);
            let mut verified = crate::watch::Watcher::verified(crate::watch::Rules::default(), vec![v]);
            for r in &entries {
                let _ = verified.observe_message(&r.payload);
            }
            let _ = verified.observe_checkpoint(&garbage);
            let _ = verified.observe_checkpoint(&cps[0].payload);
        }
    }
}
