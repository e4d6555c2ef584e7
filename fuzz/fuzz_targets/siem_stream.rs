//! What a SIEM consumer reads from the two topics, whoever wrote it: `arca-siem verify` and
//! `watch` (verified and not) never panic, whatever the messages, their order, or the leaf
//! indexes they claim; and a verified watcher's rules only ever see entries of the signed
//! log. The input is a list of messages, each either raw bytes for either topic or a
//! message of a real signed log (6 entries, checkpoints at 3 and 6), possibly re-addressed
//! to another leaf index — signatures are what no input can forge —, or a point where the
//! verified watcher is given the tree it asks for to start past leaf 0 (the signed log's
//! real tree, as its tiles give it once they make a signed root).
#![no_main]

use std::sync::OnceLock;

use arca_audit::checkpoint::Checkpoint;
use arca_audit::merkle::{self, Frontier};
use arca_audit::note::{NoteSigner, NoteVerifier};
use arca_audit::{Actor, Event, Operation, Outcome, Source};
use arca_siem_export::kafka::Record;
use arca_siem_export::watch::{Rules, Watcher};
use arca_siem_export::{ocsf, verify};
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "arca/fuzz/r1";

struct Log {
    entries: Vec<Vec<u8>>,
    request_ids: Vec<String>,
    checkpoints: Vec<Record>,
    verifier: NoteVerifier,
}

fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let signer = NoteSigner::from_seed(ORIGIN, &[9; 32]).unwrap();
        let events: Vec<Event> = (0..6u64)
            .map(|i| Event {
                time_unix_ms: 1_700_000_000_000 + i,
                request_id: format!("{i:016x}"),
                cluster: "fuzz".into(),
                region: "r1".into(),
                node: "n".into(),
                actor: Actor { entity: format!("approle:a{}", i % 2), token_accessor: None },
                source: Source { address: "10.0.0.1:4000".into(), proxy: None },
                operation: if i == 3 { Operation::KvDestroy } else { Operation::KvRead },
                path: format!("secret/data/s{}", i % 3),
                secret_version: Some(1),
                outcome: if i == 4 { Outcome::Denied } else { Outcome::Ok },
            })
            .collect();
        let entries: Vec<Vec<u8>> = events.iter().map(Event::encode).collect();
        let checkpoints = [3u64, 6]
            .iter()
            .map(|&size| {
                let mut tree = Frontier::new();
                for e in &entries[..size as usize] {
                    tree.push(merkle::leaf_hash(e));
                }
                let cp = Checkpoint { origin: ORIGIN.into(), size, root: tree.root(), extensions: vec![] };
                record(None, cp.sign(&signer).unwrap().into_bytes())
            })
            .collect();
        let request_ids = events.iter().map(|e| e.request_id.clone()).collect();
        Log { entries, request_ids, checkpoints, verifier: signer.verifier() }
    })
}

fn record(index: Option<u64>, payload: Vec<u8>) -> Record {
    Record {
        partition: 0,
        offset: 0,
        key: Some(ORIGIN.as_bytes().to_vec()),
        leaf_index_header: index.map(|i| i.to_string()),
        payload,
    }
}

/// A real entry message for `entry`, claiming leaf `index`.
fn entry_message(index: u64, entry: &[u8]) -> Record {
    let event = Event::decode(entry).unwrap();
    record(Some(index), ocsf::to_ocsf(ORIGIN, index, entry, &event).to_string().into_bytes())
}

fuzz_target!(|data: &[u8]| {
    let log = log();
    // (true: the entries topic, the record); `None`: seed the verified watcher here.
    let mut messages: Vec<Option<(bool, Record)>> = Vec::new();
    for chunk in data.split(|b| *b == 0xff).take(64) {
        let Some((&op, rest)) = chunk.split_first() else { continue };
        if op % 5 == 4 {
            messages.push(None);
            continue;
        }
        let message = match op % 5 {
            0 => (true, record(None, rest.to_vec())),
            1 => (false, record(None, rest.to_vec())),
            2 => {
                let leaf = rest.first().map_or(0, |b| *b as usize % log.entries.len());
                let index = match rest.get(1..9) {
                    Some(b) => u64::from_be_bytes(b.try_into().unwrap()),
                    None => leaf as u64,
                };
                (true, entry_message(index, &log.entries[leaf]))
            }
            _ => {
                let k = rest.first().map_or(0, |b| *b as usize % log.checkpoints.len());
                (false, log.checkpoints[k].clone())
            }
        };
        messages.push(Some(message));
    }
    let records = || messages.iter().flatten();
    let entries: Vec<Record> = records().filter(|(e, _)| *e).map(|(_, r)| r.clone()).collect();
    let checkpoints: Vec<Record> = records().filter(|(e, _)| !*e).map(|(_, r)| r.clone()).collect();
    let report = verify::verify(&entries, &checkpoints, std::slice::from_ref(&log.verifier));
    let _ = report.summary();

    let mut unverified = Watcher::new(Rules::default());
    let mut verified = Watcher::verified(Rules::default(), vec![log.verifier.clone()]);
    for message in &messages {
        let Some((is_entry, r)) = message else {
            // Tiles give the real tree, for a leaf the signed log reaches.
            for (origin, from) in verified.wants_seed() {
                if from <= log.entries.len() as u64 {
                    let mut tree = Frontier::new();
                    for e in &log.entries[..from as usize] {
                        tree.push(merkle::leaf_hash(e));
                    }
                    let alerts = verified.seed(&origin, tree).unwrap();
                    for alert in alerts.iter().filter(|a| a.rule != "stream-integrity") {
                        let leaf = alert.leaf_index as usize;
                        assert!(alert.leaf_index >= from, "a rule saw leaf {leaf}, before the seed");
                        assert_eq!(alert.request_id, log.request_ids[leaf], "not the log's entry");
                    }
                }
            }
            continue;
        };
        let alerts = if *is_entry {
            let _ = unverified.observe_message(&r.payload);
            verified.observe_message(&r.payload)
        } else {
            verified.observe_checkpoint(&r.payload)
        };
        for alert in alerts.iter().filter(|a| a.rule != "stream-integrity") {
            // Only the signed log's own entries, at their own leaves, reach the rules.
            let leaf = alert.leaf_index as usize;
            assert!(leaf < log.entries.len(), "a rule saw leaf {leaf}, past the signed log");
            assert_eq!(alert.request_id, log.request_ids[leaf], "a rule saw an entry the log does not hold");
        }
    }
});
