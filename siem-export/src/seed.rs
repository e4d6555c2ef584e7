//! Where a verified watcher starts when the topics no longer hold a log's first entries:
//! the tree of leaves `0..N`, read from the log's tiles (C2SP tlog-tiles, as a node serves
//! them under `/audit/<region>/`, or its static archive) at its latest signed checkpoint.
//!
//! Nothing here has to be trusted: the tiles must make the checkpoint's signed root, and the
//! watcher then proves the tree together with the entries after it against later signed
//! checkpoints ([`crate::watch::Watcher::seed`]).

use std::time::Duration;

use arca_audit::checkpoint::{self, Checkpoint, VerifiedCheckpoint};
use arca_audit::merkle::{self, Frontier, Hash, HashSource};
use arca_audit::note::{self, NoteVerifier};
use arca_audit::tiles::{self, TileHashSource, TileReader};

/// Largest checkpoint note read, in bytes.
const MAX_CHECKPOINT_BYTES: u64 = 64 * 1024;

/// The tree of leaves `0..leaves` of the tree of `size` leaves whose root is `root`, read
/// from `src`; refused unless a consistency proof (from the same source) shows it a prefix of
/// that tree, which binds every hash of it to the signed root.
pub fn tree_at<S>(src: &mut S, size: u64, root: &Hash, leaves: u64) -> Result<Frontier, String>
where
    S: HashSource,
    S::Error: std::fmt::Debug,
{
    if leaves > size {
        return Err(format!(
            "the log's latest signed checkpoint (size {size}) does not reach leaf {leaves} yet"
        ));
    }
    if leaves == 0 {
        return Ok(Frontier::new());
    }
    let unreadable = |e: S::Error| format!("cannot read the tree: {e:?}");
    let mut hashes = Vec::new();
    let mut start = 0u64;
    for level in (0..64u32).rev() {
        if leaves >> level & 1 == 1 {
            hashes.push(src.subtree(level, start >> level).map_err(unreadable)?);
            start += 1 << level;
        }
    }
    let tree = Frontier::from_parts(leaves, hashes).ok_or("internal: a frontier of the wrong shape")?;
    let proof =
        merkle::consistency_proof(src, leaves, size).map_err(unreadable)?.map_err(|e| e.to_string())?;
    merkle::verify_consistency(leaves, size, &tree.root(), root, &proof)
        .map_err(|_| format!("the tiles do not make the signed root of size {size}"))?;
    Ok(tree)
}

/// A log's tiles over HTTP, under `base` (`http://node:8200/audit/<region>`).
#[derive(Debug)]
pub struct HttpTiles {
    base: String,
    agent: ureq::Agent,
}

impl HttpTiles {
    pub fn new(base: &str, timeout: Duration) -> HttpTiles {
        let agent = ureq::Agent::config_builder().timeout_global(Some(timeout)).build().into();
        HttpTiles { base: base.trim_end_matches('/').to_owned(), agent }
    }

    /// Where the tiles are.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn get(&self, path: &str, limit: u64) -> Result<Vec<u8>, String> {
        let url = format!("{}/{path}", self.base);
        let mut response = self.agent.get(&url).call().map_err(|e| format!("cannot fetch {url}: {e}"))?;
        response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| format!("cannot read {url}: {e}"))
    }

    /// The log's latest checkpoint, opened with the verifier of its origin among `verifiers`.
    pub fn checkpoint(&self, verifiers: &[NoteVerifier]) -> Result<VerifiedCheckpoint, String> {
        let raw = self.get("checkpoint", MAX_CHECKPOINT_BYTES)?;
        let text = String::from_utf8(raw).map_err(|_| format!("{}/checkpoint is not text", self.base))?;
        let body = note::unverified_text(&text).unwrap_or(&text);
        let claimed = Checkpoint::parse(body).map_err(|e| format!("{}/checkpoint: {e}", self.base))?;
        let verifier = verifiers.iter().find(|v| v.name() == claimed.origin).ok_or_else(|| {
            format!("{}/checkpoint is of {}, a log without a key here", self.base, claimed.origin)
        })?;
        checkpoint::open(&text, verifier)
            .map_err(|e| format!("{}/checkpoint does not verify: {e}", self.base))
    }

    /// The tree of leaves `0..leaves`, at the log's latest signed checkpoint (also returned,
    /// for the watcher to take).
    pub fn tree(
        &self,
        leaves: u64,
        verifiers: &[NoteVerifier],
    ) -> Result<(Frontier, VerifiedCheckpoint), String> {
        let cp = self.checkpoint(verifiers)?;
        let reader = HttpTiles { base: self.base.clone(), agent: self.agent.clone() };
        let mut src = TileHashSource::new(reader, cp.size());
        let tree = tree_at(&mut src, cp.size(), cp.root(), leaves)?;
        Ok((tree, cp))
    }
}

impl TileReader for HttpTiles {
    type Error = String;

    fn read_tile(&mut self, level: u32, index: u64, width: u64) -> Result<Vec<Hash>, String> {
        let data = self.get(&tiles::tile_path(level, index, width), width * 32)?;
        let hashes = tiles::tile_hashes(&data).map_err(|e| format!("tile {level}/{index}: {e:?}"))?;
        if hashes.len() as u64 != width {
            return Err(format!("tile {level}/{index}: {} hashes, not {width}", hashes.len()));
        }
        Ok(hashes)
    }
}

#[cfg(test)]
mod tests {
    use arca_audit::merkle::{MemoryTree, leaf_hash};

    use super::*;

    /// Tiles cut from a memory tree, optionally with one hash altered.
    struct Tiles(MemoryTree, Option<(u32, u64)>);
    impl TileReader for Tiles {
        type Error = ();
        fn read_tile(&mut self, level: u32, index: u64, width: u64) -> Result<Vec<Hash>, ()> {
            let mut hashes: Vec<Hash> = (0..width)
                .map(|i| self.0.subtree(level * tiles::TILE_HEIGHT, index * tiles::TILE_WIDTH + i).unwrap())
                .collect();
            if self.1 == Some((level, index)) {
                hashes[0][0] ^= 1;
            }
            Ok(hashes)
        }
    }

    #[test]
    fn the_tree_before_any_leaf_is_read_from_tiles_that_make_the_signed_root() {
        let mut tree = MemoryTree::new();
        let mut frontiers = vec![Frontier::new()];
        for i in 0..70_000u64 {
            let leaf = leaf_hash(&i.to_be_bytes());
            tree.push(leaf);
            let mut next = frontiers.last().unwrap().clone();
            next.push(leaf);
            if [1, 255, 256, 257, 4_097, 65_536, 69_999].contains(&(i + 1)) {
                frontiers.push(next);
            } else {
                *frontiers.last_mut().unwrap() = next;
            }
        }
        let size = tree.size();
        let root = merkle::root(&mut tree.clone(), size).unwrap();
        for expected in frontiers.iter().filter(|f| f.size() > 0) {
            let mut src = TileHashSource::new(Tiles(tree.clone(), None), size);
            let got = tree_at(&mut src, size, &root, expected.size()).unwrap();
            assert_eq!(got, *expected, "leaves 0..{}", expected.size());
        }
        let mut src = TileHashSource::new(Tiles(tree.clone(), None), size);
        assert!(tree_at(&mut src, size, &root, size + 1).unwrap_err().contains("does not reach"));
        // Tiles that do not make the signed root are refused.
        let mut forged = TileHashSource::new(Tiles(tree.clone(), Some((0, 3))), size);
        assert!(
            tree_at(&mut forged, size, &root, 1_000).unwrap_err().contains("do not make the signed root")
        );
    }
}
