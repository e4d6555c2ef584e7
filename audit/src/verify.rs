//! Verifying a whole log from its tiles: every entry against the level-0 tiles, every
//! higher tile against the tiles below, the root against the signed checkpoint, the log's
//! history against a checkpoint seen before, and no gap.
//!
//! The log is read through a [`LogReader`] (HTTP, a directory, the store), so this code does
//! no I/O of its own. Failures say what is wrong and where.

use crate::checkpoint::{self, VerifiedCheckpoint};
use crate::merkle::{Frontier, Hash, leaf_hash};
use crate::note::NoteVerifier;
use crate::tiles::{self, TILE_HEIGHT, TILE_WIDTH};

/// Reads a log's published files.
pub trait LogReader {
    /// The signed checkpoint.
    fn checkpoint(&mut self) -> Result<String, String>;
    /// A hash tile of `width` hashes; `None` if it does not exist.
    fn tile(&mut self, level: u32, index: u64, width: u64) -> Result<Option<Vec<u8>>, String>;
    /// An entry bundle of `width` entries; `None` if it does not exist.
    fn entries(&mut self, index: u64, width: u64) -> Result<Option<Vec<u8>>, String>;
}

/// What a successful verification established.
#[derive(Debug, Clone)]
pub struct Report {
    pub checkpoint: VerifiedCheckpoint,
    pub entries: u64,
    pub tiles: u64,
}

/// Why a log failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("cannot read {what}: {message}")]
    Read { what: String, message: String },
    #[error("the checkpoint does not verify: {0}")]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{0} is missing: the log has a gap")]
    Missing(String),
    #[error("{path} is malformed: {message}")]
    Malformed { path: String, message: String },
    #[error(
        "entry bundle {path} holds {found} entries, the checkpoint needs {expected}: entries were removed or added"
    )]
    WrongEntryCount { path: String, expected: u64, found: u64 },
    #[error("entry {index} does not match its hash in {tile}: the entry or the tile was altered")]
    EntryMismatch { index: u64, tile: String },
    #[error("hash {position} of {tile} does not match the tiles below it: the tile was altered")]
    TileMismatch { tile: String, position: u64 },
    #[error(
        "the entries hash to a different root than the signed checkpoint of size {size}: the log was altered"
    )]
    RootMismatch { size: u64 },
    #[error("entry {index} is not a valid audit event: {message}")]
    BadEntry { index: u64, message: String },
    #[error("the log shrank from {seen} entries (seen before) to {now}: history was rolled back or forked")]
    Shrank { seen: u64, now: u64 },
    #[error(
        "the log's first {size} entries differ from the checkpoint seen before: history was rewritten (a fork)"
    )]
    Forked { size: u64 },
}

/// Vets one entry's contents (e.g. decodes it as an event): `Err` names what is wrong.
pub type EntryCheck<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), String>;

/// A checkpoint seen before, to check that the log only grew since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub size: u64,
    pub root: Hash,
}

/// Verifies the log end to end. `check_entry` vets each entry's contents (e.g. decodes it as
/// an event); `progress(done, total)` is called after each bundle.
pub fn verify_log(
    reader: &mut dyn LogReader,
    verifier: &NoteVerifier,
    seen: Option<Seen>,
    check_entry: EntryCheck<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, VerifyError> {
    let note = reader
        .checkpoint()
        .map_err(|message| VerifyError::Read { what: "the checkpoint".into(), message })?;
    let checkpoint = checkpoint::open(&note, verifier)?;
    let size = checkpoint.size();
    if let Some(seen) = seen
        && seen.size > size
    {
        return Err(VerifyError::Shrank { seen: seen.size, now: size });
    }
    let mut frontier = Frontier::new();
    // Complete subtree hashes at levels 8, 16, … as computed from the entries: what the
    // higher tiles must hold.
    let mut expected_rows: Vec<Vec<Hash>> = vec![Vec::new(); 8];
    let mut tiles_checked = 0u64;
    let bundles = size.div_ceil(TILE_WIDTH);
    for n in 0..bundles {
        let width = tiles::tile_width(0, n, size);
        let path = tiles::entries_path(n, width);
        let bundle = reader
            .entries(n, width)
            .map_err(|message| VerifyError::Read { what: path.clone(), message })?
            .ok_or_else(|| VerifyError::Missing(path.clone()))?;
        let entries = tiles::bundle_entries(&bundle)
            .map_err(|e| VerifyError::Malformed { path: path.clone(), message: e.to_string() })?;
        if entries.len() as u64 != width {
            return Err(VerifyError::WrongEntryCount { path, expected: width, found: entries.len() as u64 });
        }
        let tile_path = tiles::tile_path(0, n, width);
        let tile = read_tile(reader, 0, n, width)?;
        for (i, entry) in entries.iter().enumerate() {
            let index = n * TILE_WIDTH + i as u64;
            let hash = leaf_hash(entry);
            if tile[i] != hash {
                return Err(VerifyError::EntryMismatch { index, tile: tile_path });
            }
            check_entry(index, entry).map_err(|message| VerifyError::BadEntry { index, message })?;
            for (level, index, hash) in frontier.push(hash) {
                if level % TILE_HEIGHT == 0 && level / TILE_HEIGHT < 8 {
                    let row = &mut expected_rows[(level / TILE_HEIGHT) as usize];
                    debug_assert_eq!(row.len() as u64, index);
                    row.push(hash);
                }
            }
            if let Some(seen) = seen
                && frontier.size() == seen.size
                && frontier.root() != seen.root
            {
                return Err(VerifyError::Forked { size: seen.size });
            }
        }
        tiles_checked += 1;
        progress(n + 1, bundles);
    }
    if frontier.root() != *checkpoint.root() || (size == 0 && seen.is_some_and(|s| s.size > 0)) {
        return Err(VerifyError::RootMismatch { size });
    }
    // Higher tiles: each must hold exactly the complete subtrees computed above.
    for level in 1..8u32 {
        let row = &expected_rows[level as usize];
        for n in 0..(row.len() as u64).div_ceil(TILE_WIDTH) {
            let width = tiles::tile_width(level, n, size);
            let tile = read_tile(reader, level, n, width)?;
            for (i, hash) in tile.iter().enumerate() {
                if row[(n * TILE_WIDTH) as usize + i] != *hash {
                    return Err(VerifyError::TileMismatch {
                        tile: tiles::tile_path(level, n, width),
                        position: i as u64,
                    });
                }
            }
            tiles_checked += 1;
        }
    }
    Ok(Report { checkpoint, entries: size, tiles: tiles_checked })
}

fn read_tile(
    reader: &mut dyn LogReader,
    level: u32,
    index: u64,
    width: u64,
) -> Result<Vec<Hash>, VerifyError> {
    let path = tiles::tile_path(level, index, width);
    let data = reader
        .tile(level, index, width)
        .map_err(|message| VerifyError::Read { what: path.clone(), message })?
        .ok_or_else(|| VerifyError::Missing(path.clone()))?;
    let hashes = tiles::tile_hashes(&data)
        .map_err(|e| VerifyError::Malformed { path: path.clone(), message: e.to_string() })?;
    if hashes.len() as u64 != width {
        return Err(VerifyError::Malformed {
            path,
            message: format!("holds {} hashes, expected {width}", hashes.len()),
        });
    }
    Ok(hashes)
}

/// A whole log in memory, in the published layout: for tests and tools.
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    pub checkpoint: String,
    pub tiles: std::collections::BTreeMap<(u32, u64), Vec<u8>>,
    pub bundles: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl MemoryLog {
    /// Builds the published files of a log holding `entries`, signed by `signer`.
    pub fn build(entries: &[Vec<u8>], signer: &crate::note::NoteSigner) -> Self {
        let mut log = MemoryLog::default();
        let mut frontier = Frontier::new();
        for (i, entry) in entries.iter().enumerate() {
            let i = i as u64;
            tiles::bundle_push(log.bundles.entry(i / TILE_WIDTH).or_default(), entry)
                .expect("entry fits a bundle");
            let hash = leaf_hash(entry);
            log.tiles.entry((0, i / TILE_WIDTH)).or_default().extend_from_slice(&hash);
            for (level, index, hash) in frontier.push(hash) {
                if level % TILE_HEIGHT == 0 {
                    log.tiles
                        .entry((level / TILE_HEIGHT, index / TILE_WIDTH))
                        .or_default()
                        .extend_from_slice(&hash);
                }
            }
        }
        let cp = checkpoint::Checkpoint {
            origin: signer.name().to_owned(),
            size: frontier.size(),
            root: frontier.root(),
            extensions: vec![],
        };
        log.checkpoint = cp.sign(signer).expect("signer name is the origin");
        log
    }
}

impl LogReader for MemoryLog {
    fn checkpoint(&mut self) -> Result<String, String> {
        Ok(self.checkpoint.clone())
    }

    fn tile(&mut self, level: u32, index: u64, width: u64) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .tiles
            .get(&(level, index))
            .filter(|t| t.len() as u64 >= width * 32)
            .map(|t| t[..(width * 32) as usize].to_vec()))
    }

    fn entries(&mut self, index: u64, _width: u64) -> Result<Option<Vec<u8>>, String> {
        Ok(self.bundles.get(&index).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::note::NoteSigner;

    fn signer() -> NoteSigner {
        NoteSigner::from_seed("arca/test/local", &[3; 32]).unwrap()
    }

    fn entries(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("event {i}").into_bytes()).collect()
    }

    fn run(log: &mut MemoryLog, seen: Option<Seen>) -> Result<Report, VerifyError> {
        verify_log(log, &signer().verifier(), seen, &mut |_, _| Ok(()), &mut |_, _| {})
    }

    #[test]
    fn an_honest_log_verifies_at_every_size() {
        for n in [0usize, 1, 255, 256, 257, 1000, 65_536 + 3] {
            let report = run(&mut MemoryLog::build(&entries(n), &signer()), None).unwrap();
            assert_eq!(report.entries, n as u64);
        }
    }

    #[test]
    fn an_altered_entry_is_found() {
        let mut log = MemoryLog::build(&entries(600), &signer());
        let bundle = log.bundles.get_mut(&1).unwrap();
        let last = bundle.len() - 1;
        bundle[last] ^= 1;
        let err = run(&mut log, None).unwrap_err();
        assert_eq!(err, VerifyError::EntryMismatch { index: 511, tile: "tile/0/001".into() });
        assert!(err.to_string().contains("entry 511"));
    }

    #[test]
    fn a_deleted_entry_is_found() {
        let mut log = MemoryLog::build(&entries(600), &signer());
        let bundle = log.bundles.get(&0).unwrap().clone();
        let mut rest = tiles::bundle_entries(&bundle).unwrap();
        rest.remove(10);
        let mut shorter = Vec::new();
        for e in rest {
            tiles::bundle_push(&mut shorter, e).unwrap();
        }
        log.bundles.insert(0, shorter);
        assert!(matches!(
            run(&mut log, None),
            Err(VerifyError::WrongEntryCount { expected: 256, found: 255, .. })
        ));
        log.bundles.remove(&1);
        let mut log2 = MemoryLog::build(&entries(600), &signer());
        log2.bundles.remove(&1);
        assert_eq!(run(&mut log2, None).unwrap_err(), VerifyError::Missing("tile/entries/001".into()));
    }

    #[test]
    fn a_consistent_rewrite_of_entries_and_tiles_fails_the_signature_or_the_root() {
        // Rewrite an entry and its tile hash consistently: the root no longer matches.
        let mut log = MemoryLog::build(&entries(300), &signer());
        let mut forged = entries(300);
        forged[5] = b"forged".to_vec();
        let rebuilt = MemoryLog::build(&forged, &signer());
        log.bundles = rebuilt.bundles;
        log.tiles = rebuilt.tiles;
        assert_eq!(run(&mut log, None).unwrap_err(), VerifyError::RootMismatch { size: 300 });
        // Re-signing with another key fails the signature.
        let other = NoteSigner::from_seed("arca/test/local", &[4; 32]).unwrap();
        let mut resigned = MemoryLog::build(&forged, &other);
        assert!(matches!(run(&mut resigned, None), Err(VerifyError::Checkpoint(_))));
    }

    #[test]
    fn a_fork_re_signed_with_the_real_key_is_caught_by_the_state() {
        let honest = MemoryLog::build(&entries(300), &signer());
        let seen = {
            let report = run(&mut honest.clone(), None).unwrap();
            Seen { size: report.checkpoint.size(), root: *report.checkpoint.root() }
        };
        // The operator rewrites history and re-signs it, then appends more.
        let mut forged = entries(400);
        forged[7] = b"rewritten".to_vec();
        let mut fork = MemoryLog::build(&forged, &signer());
        assert!(run(&mut fork.clone(), None).is_ok(), "on its own the fork looks valid");
        assert_eq!(run(&mut fork, Some(seen)).unwrap_err(), VerifyError::Forked { size: 300 });
        let mut rollback = MemoryLog::build(&entries(200), &signer());
        assert_eq!(run(&mut rollback, Some(seen)).unwrap_err(), VerifyError::Shrank { seen: 300, now: 200 });
        let mut grown = MemoryLog::build(&entries(700), &signer());
        assert!(run(&mut grown, Some(seen)).is_ok(), "honest growth verifies against the state");
    }

    #[test]
    fn an_altered_upper_tile_is_found() {
        let mut log = MemoryLog::build(&entries(70_000), &signer());
        log.tiles.get_mut(&(1, 0)).unwrap()[40] ^= 1;
        assert_eq!(
            run(&mut log, None).unwrap_err(),
            VerifyError::TileMismatch { tile: "tile/1/000".into(), position: 1 }
        );
    }
}
