//! The C2SP tlog-tiles layout.
//!
//! The tree's hashes are stored in tiles of 256 hashes: tile `(L, N)` holds the hashes at
//! tree level `8·L` with indexes `256·N … 256·N+255`. A tile on the right edge is *partial*:
//! it holds only the hashes that exist, and is served at `….p/<width>`. Entries are stored in
//! bundles of 256: bundle `N` holds entries `256·N …`, each prefixed by its length as a
//! big-endian u16.
//!
//! Paths: `tile/<L>/<N>` and `tile/entries/<N>`, where `N` is written in groups of three
//! digits, all but the last prefixed by `x` (`1234067` → `x001/x234/067`).

use crate::merkle::{self, Hash, HashSource};

/// Hashes (or entries) per full tile.
pub const TILE_WIDTH: u64 = 256;
/// Tree levels per tile level.
pub const TILE_HEIGHT: u32 = 8;

/// Why tile data or a tile path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TileError {
    #[error("malformed tile path")]
    BadPath,
    #[error("tile data is not a whole number of hashes, or holds more than 256")]
    BadTile,
    #[error("entry bundle is malformed")]
    BadBundle,
    #[error("an entry is longer than 65535 bytes")]
    EntryTooLong,
}

fn index_path(index: u64) -> String {
    let mut groups = Vec::new();
    let mut n = index;
    loop {
        groups.push(n % 1000);
        n /= 1000;
        if n == 0 {
            break;
        }
    }
    let last = groups.len() - 1;
    groups
        .iter()
        .rev()
        .enumerate()
        .map(|(i, g)| if i < last { format!("x{g:03}") } else { format!("{g:03}") })
        .collect::<Vec<_>>()
        .join("/")
}

fn width_suffix(width: u64) -> String {
    if width >= TILE_WIDTH { String::new() } else { format!(".p/{width}") }
}

/// The path of hash tile `(level, index)` holding `width` hashes (256: full).
pub fn tile_path(level: u32, index: u64, width: u64) -> String {
    format!("tile/{level}/{}{}", index_path(index), width_suffix(width))
}

/// The path of entry bundle `index` holding `width` entries.
pub fn entries_path(index: u64, width: u64) -> String {
    format!("tile/entries/{}{}", index_path(index), width_suffix(width))
}

/// A parsed tile path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TilePath {
    Hashes { level: u32, index: u64, width: u64 },
    Entries { index: u64, width: u64 },
}

/// Parses a path (relative to the log's prefix) back into a tile; strict, canonical only.
pub fn parse_path(path: &str) -> Result<TilePath, TileError> {
    let rest = path.strip_prefix("tile/").ok_or(TileError::BadPath)?;
    let (kind, rest) = rest.split_once('/').ok_or(TileError::BadPath)?;
    let (index_part, width) = match rest.split_once(".p/") {
        Some((index, w)) => {
            let width: u64 = w.parse().map_err(|_| TileError::BadPath)?;
            if !(1..TILE_WIDTH).contains(&width) || w != width.to_string() {
                return Err(TileError::BadPath);
            }
            (index, width)
        }
        None => (rest, TILE_WIDTH),
    };
    let mut index: u64 = 0;
    let groups: Vec<&str> = index_part.split('/').collect();
    for (i, group) in groups.iter().enumerate() {
        let digits =
            if i + 1 < groups.len() { group.strip_prefix('x').ok_or(TileError::BadPath)? } else { group };
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TileError::BadPath);
        }
        index = index
            .checked_mul(1000)
            .and_then(|n| n.checked_add(digits.parse::<u64>().ok()?))
            .ok_or(TileError::BadPath)?;
    }
    if index_path(index) != index_part {
        return Err(TileError::BadPath);
    }
    if kind == "entries" {
        return Ok(TilePath::Entries { index, width });
    }
    let level: u32 = kind.parse().map_err(|_| TileError::BadPath)?;
    if kind != level.to_string() || level > 7 {
        return Err(TileError::BadPath);
    }
    Ok(TilePath::Hashes { level, index, width })
}

/// Splits tile data into hashes.
pub fn tile_hashes(data: &[u8]) -> Result<Vec<Hash>, TileError> {
    if !data.len().is_multiple_of(32) || data.len() as u64 > TILE_WIDTH * 32 || data.is_empty() {
        return Err(TileError::BadTile);
    }
    Ok(data.chunks_exact(32).map(|c| c.try_into().expect("32-byte chunk")).collect())
}

/// Appends one entry to a bundle.
pub fn bundle_push(bundle: &mut Vec<u8>, entry: &[u8]) -> Result<(), TileError> {
    let len = u16::try_from(entry.len()).map_err(|_| TileError::EntryTooLong)?;
    bundle.extend_from_slice(&len.to_be_bytes());
    bundle.extend_from_slice(entry);
    Ok(())
}

/// Splits a bundle into its entries.
pub fn bundle_entries(data: &[u8]) -> Result<Vec<&[u8]>, TileError> {
    let mut entries = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = data.get(at..at + 2).ok_or(TileError::BadBundle)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let entry = data.get(at + 2..at + 2 + len).ok_or(TileError::BadBundle)?;
        entries.push(entry);
        at += 2 + len;
        if entries.len() as u64 > TILE_WIDTH {
            return Err(TileError::BadBundle);
        }
    }
    Ok(entries)
}

/// The width of tile `(level, index)` in a tree of `size` leaves (0 if it does not exist).
pub fn tile_width(level: u32, index: u64, size: u64) -> u64 {
    let hashes_at_level = size >> (TILE_HEIGHT * level);
    hashes_at_level.saturating_sub(index * TILE_WIDTH).min(TILE_WIDTH)
}

/// Reads hash tiles (at the width the tree needs).
pub trait TileReader {
    type Error;
    fn read_tile(&mut self, level: u32, index: u64, width: u64) -> Result<Vec<Hash>, Self::Error>;
}

/// A [`HashSource`] over tiles, for a tree of a given size.
#[derive(Debug)]
pub struct TileHashSource<R> {
    reader: R,
    size: u64,
    cache: std::collections::HashMap<(u32, u64), Vec<Hash>>,
}

impl<R: TileReader> TileHashSource<R> {
    pub fn new(reader: R, size: u64) -> Self {
        TileHashSource { reader, size, cache: Default::default() }
    }
}

/// Why a subtree could not be read from tiles.
#[derive(Debug)]
pub enum TileSourceError<E> {
    Read(E),
    /// A tile was shorter than the tree needs.
    ShortTile {
        level: u32,
        index: u64,
    },
}

impl<R: TileReader> HashSource for TileHashSource<R> {
    type Error = TileSourceError<R::Error>;

    fn subtree(&mut self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        let tile_level = level / TILE_HEIGHT;
        let height = level % TILE_HEIGHT;
        let first = index << height;
        let count = 1u64 << height;
        let tile_index = first / TILE_WIDTH;
        let offset = (first % TILE_WIDTH) as usize;
        let width = tile_width(tile_level, tile_index, self.size);
        if !self.cache.contains_key(&(tile_level, tile_index)) {
            let hashes =
                self.reader.read_tile(tile_level, tile_index, width).map_err(TileSourceError::Read)?;
            self.cache.insert((tile_level, tile_index), hashes);
        }
        let hashes = &self.cache[&(tile_level, tile_index)];
        let row = hashes
            .get(offset..offset + count as usize)
            .ok_or(TileSourceError::ShortTile { level: tile_level, index: tile_index })?;
        Ok(merkle::complete_root(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{MemoryTree, leaf_hash, root};

    #[test]
    fn paths_follow_the_spec() {
        assert_eq!(tile_path(0, 1_234_067, 256), "tile/0/x001/x234/067");
        assert_eq!(tile_path(1, 5, 17), "tile/1/005.p/17");
        assert_eq!(entries_path(0, 3), "tile/entries/000.p/3");
        assert_eq!(entries_path(1000, 256), "tile/entries/x001/000");
        for path in
            ["tile/0/x001/x234/067", "tile/1/005.p/17", "tile/entries/000.p/3", "tile/entries/x001/000"]
        {
            let parsed = parse_path(path).unwrap();
            let back = match parsed {
                TilePath::Hashes { level, index, width } => tile_path(level, index, width),
                TilePath::Entries { index, width } => entries_path(index, width),
            };
            assert_eq!(back, path);
        }
        for bad in [
            "tile/0/1",
            "tile/0/x000/001",
            "tile/0/001.p/0",
            "tile/0/001.p/256",
            "tile/0/001.p/07",
            "tile/8/001",
            "tile/00/001",
            "tile/0/abc",
            "tiles/0/001",
            "tile/0/x1/001",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bundles_round_trip_and_reject_garbage() {
        let mut bundle = Vec::new();
        for entry in [&b"a"[..], b"", b"hello"] {
            bundle_push(&mut bundle, entry).unwrap();
        }
        assert_eq!(bundle_entries(&bundle).unwrap(), vec![&b"a"[..], b"", b"hello"]);
        assert!(bundle_entries(&bundle[..bundle.len() - 1]).is_err());
        assert!(bundle_push(&mut Vec::new(), &vec![0; 65_536]).is_err());
    }

    /// Tiles built from a memory tree serve the same roots and proofs.
    struct Tiles(MemoryTree);
    impl TileReader for Tiles {
        type Error = ();
        fn read_tile(&mut self, level: u32, index: u64, width: u64) -> Result<Vec<Hash>, ()> {
            (0..width)
                .map(|i| self.0.subtree(TILE_HEIGHT * level, index * TILE_WIDTH + i).map_err(|_| ()))
                .collect()
        }
    }

    #[test]
    fn tile_source_agrees_with_the_tree() {
        let mut tree = MemoryTree::new();
        for i in 0u32..70_000 {
            tree.push(leaf_hash(&i.to_be_bytes()));
        }
        for size in [1u64, 255, 256, 257, 65_535, 65_536, 65_537, 70_000] {
            let expected = root(&mut tree, size).unwrap();
            let mut tiles = TileHashSource::new(Tiles(tree.clone()), size);
            assert_eq!(root(&mut tiles, size).unwrap(), expected, "size {size}");
            let proof = merkle::inclusion_proof(&mut tiles, size / 2, size).unwrap().unwrap();
            merkle::verify_inclusion(size / 2, size, &tree.leaves()[(size / 2) as usize], &proof, &expected)
                .unwrap();
        }
    }
}
