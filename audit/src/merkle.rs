//! RFC 6962 Merkle trees (as updated by RFC 9162 §2.1): hashing, tree heads, inclusion and
//! consistency proofs — generation over any source of subtree hashes, and verification.
//!
//! A *subtree* `(level, index)` is the complete subtree of `2^level` leaves starting at leaf
//! `index << level`. Proof generation only ever asks a [`HashSource`] for such subtrees
//! (RFC 6962's recursion splits every range at a power of two, so its left parts are
//! always complete and aligned), which is what tiles store.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The hash of an empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of a complete subtree given its `2^k` leaf-level hashes, in order.
pub fn complete_root(hashes: &[Hash]) -> Hash {
    debug_assert!(hashes.len().is_power_of_two());
    let mut level: Vec<Hash> = hashes.to_vec();
    while level.len() > 1 {
        level = level.chunks(2).map(|pair| node_hash(&pair[0], &pair[1])).collect();
    }
    level[0]
}

/// Where proof generation gets complete subtree hashes from.
pub trait HashSource {
    type Error;
    /// The hash of the complete subtree of `2^level` leaves starting at leaf `index << level`.
    fn subtree(&mut self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// Why a proof request or a proof is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("sizes {old} and {new} do not describe a growing tree")]
    BadSizes { old: u64, new: u64 },
    #[error("the proof has the wrong number of hashes")]
    WrongLength,
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
}

fn largest_power_of_two_below(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH of leaves `[lo, hi)`, from complete subtrees.
fn range_hash<S: HashSource>(src: &mut S, lo: u64, hi: u64) -> Result<Hash, S::Error> {
    let n = hi - lo;
    if n.is_power_of_two() && lo.is_multiple_of(n) {
        return src.subtree(n.trailing_zeros(), lo >> n.trailing_zeros());
    }
    let k = largest_power_of_two_below(n);
    let left = range_hash(src, lo, lo + k)?;
    let right = range_hash(src, lo + k, hi)?;
    Ok(node_hash(&left, &right))
}

/// The root of a tree of `size` leaves.
pub fn root<S: HashSource>(src: &mut S, size: u64) -> Result<Hash, S::Error> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_hash(src, 0, size)
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 6962 PATH).
pub fn inclusion_proof<S: HashSource>(
    src: &mut S,
    index: u64,
    size: u64,
) -> Result<Result<Vec<Hash>, ProofError>, S::Error> {
    if index >= size {
        return Ok(Err(ProofError::IndexOutOfRange { index, size }));
    }
    let mut proof = Vec::new();
    let (mut lo, mut hi) = (0, size);
    // Walk down, collecting siblings top-first, then reverse (RFC order is bottom-first).
    while hi - lo > 1 {
        let k = largest_power_of_two_below(hi - lo);
        if index < lo + k {
            proof.push(range_hash(src, lo + k, hi)?);
            hi = lo + k;
        } else {
            proof.push(range_hash(src, lo, lo + k)?);
            lo += k;
        }
    }
    proof.reverse();
    Ok(Ok(proof))
}

/// The consistency proof between the trees of `old` and `new` leaves (RFC 6962 PROOF).
pub fn consistency_proof<S: HashSource>(
    src: &mut S,
    old: u64,
    new: u64,
) -> Result<Result<Vec<Hash>, ProofError>, S::Error> {
    if old > new {
        return Ok(Err(ProofError::BadSizes { old, new }));
    }
    if old == 0 || old == new {
        return Ok(Ok(Vec::new()));
    }
    let mut proof = Vec::new();
    let (mut m, mut lo, mut hi, mut whole) = (old, 0u64, new, true);
    loop {
        let n = hi - lo;
        if m == n {
            if !whole {
                proof.push(range_hash(src, lo, hi)?);
            }
            break;
        }
        let k = largest_power_of_two_below(n);
        if m <= k {
            proof.push(range_hash(src, lo + k, hi)?);
            hi = lo + k;
        } else {
            proof.push(range_hash(src, lo, lo + k)?);
            lo += k;
            m -= k;
            whole = false;
        }
    }
    proof.reverse();
    Ok(Ok(proof))
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves with root `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Verifies that the tree of `old` leaves with root `old_root` is a prefix of the tree of
/// `new` leaves with root `new_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old > new {
        return Err(ProofError::BadSizes { old, new });
    }
    if old == new {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if old_root == new_root { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    if old == 0 {
        return if proof.is_empty() { Ok(()) } else { Err(ProofError::WrongLength) };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut fn_, mut sn) = (old - 1, new - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != old_root || &sr != new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a tree: the roots of its maximal complete subtrees, largest (leftmost)
/// first. Appending a leaf costs O(log n); the root folds the edge right to left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// `(level, hash)`, levels strictly decreasing.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn new() -> Self {
        Frontier::default()
    }

    /// Rebuilds a frontier from its parts (as persisted).
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Option<Self> {
        let levels: Vec<u32> = (0..64).rev().filter(|l| size >> l & 1 == 1).collect();
        if levels.len() != hashes.len() {
            return None;
        }
        Some(Frontier { size, nodes: levels.into_iter().zip(hashes).collect() })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The subtree roots, largest first.
    pub fn hashes(&self) -> Vec<Hash> {
        self.nodes.iter().map(|(_, h)| *h).collect()
    }

    /// Appends a leaf hash; returns the complete subtrees this completed, as
    /// `(level, index, hash)` for levels ≥ 1, smallest first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(u32, u64, Hash)> {
        let mut completed = Vec::new();
        let mut node = (0u32, leaf);
        while let Some(&(level, left)) = self.nodes.last() {
            if level != node.0 {
                break;
            }
            self.nodes.pop();
            let parent = node_hash(&left, &node.1);
            let level = level + 1;
            // The new subtree ends at leaf `size` (inclusive): its index at `level`.
            completed.push((level, (self.size + 1 - (1 << level)) >> level, parent));
            node = (level, parent);
        }
        self.nodes.push(node);
        self.size += 1;
        completed
    }

    pub fn root(&self) -> Hash {
        let mut iter = self.nodes.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return empty_root();
        };
        for (_, left) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// An in-memory tree holding every level: the reference [`HashSource`] for tests and tools.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    pub fn new() -> Self {
        MemoryTree::default()
    }

    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut level = 0;
        while self.levels[level].len().is_multiple_of(2) {
            let row = &self.levels[level];
            let parent = node_hash(&row[row.len() - 2], &row[row.len() - 1]);
            if self.levels.len() == level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
        }
    }

    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub fn leaves(&self) -> &[Hash] {
        self.levels.first().map_or(&[], Vec::as_slice)
    }
}

impl HashSource for MemoryTree {
    type Error = ProofError;

    fn subtree(&mut self, level: u32, index: u64) -> Result<Hash, ProofError> {
        self.levels
            .get(level as usize)
            .and_then(|row| row.get(index as usize))
            .copied()
            .ok_or(ProofError::IndexOutOfRange { index: index << level, size: self.size() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    const LEAVES: [&str; 8] =
        ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn vector_tree() -> MemoryTree {
        let mut tree = MemoryTree::new();
        for leaf in LEAVES {
            tree.push(leaf_hash(&hex::decode(leaf).unwrap()));
        }
        tree
    }

    #[test]
    fn rfc6962_roots() {
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut tree = vector_tree();
        let mut frontier = Frontier::new();
        for (i, expected) in ROOTS.iter().enumerate() {
            frontier.push(tree.leaves()[i]);
            assert_eq!(root(&mut tree, i as u64 + 1).unwrap(), h(expected), "size {}", i + 1);
            assert_eq!(frontier.root(), h(expected), "frontier size {}", i + 1);
        }
    }

    #[test]
    fn rfc6962_proof_vectors() {
        let mut tree = vector_tree();
        let inclusion = [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ]
        .map(h);
        assert_eq!(inclusion_proof(&mut tree, 5, 8).unwrap().unwrap(), inclusion);
        verify_inclusion(5, 8, &tree.leaves()[5], &inclusion, &h(ROOTS[7])).unwrap();
        assert!(verify_inclusion(4, 8, &tree.leaves()[5], &inclusion, &h(ROOTS[7])).is_err());
        assert_eq!(inclusion_proof(&mut tree, 2, 3).unwrap().unwrap(), vec![h(ROOTS[1])]);

        let consistency = [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ]
        .map(h);
        assert_eq!(consistency_proof(&mut tree, 6, 8).unwrap().unwrap(), consistency);
        verify_consistency(6, 8, &h(ROOTS[5]), &h(ROOTS[7]), &consistency).unwrap();
        assert!(verify_consistency(6, 8, &h(ROOTS[4]), &h(ROOTS[7]), &consistency).is_err());
        let two_five = [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ]
        .map(h);
        assert_eq!(consistency_proof(&mut tree, 2, 5).unwrap().unwrap(), two_five);
        verify_consistency(2, 5, &h(ROOTS[1]), &h(ROOTS[4]), &two_five).unwrap();
    }

    /// rs_merkle, an independent implementation, with RFC 6962 node hashing: its model
    /// (pair up, promote an odd last node) gives the same roots as RFC 6962's split.
    #[derive(Clone)]
    struct Rfc6962;
    impl rs_merkle::Hasher for Rfc6962 {
        type Hash = [u8; 32];
        fn hash(data: &[u8]) -> [u8; 32] {
            Sha256::digest(data).into()
        }
        fn concat_and_hash(left: &[u8; 32], right: Option<&[u8; 32]>) -> [u8; 32] {
            match right {
                Some(right) => node_hash(left, right),
                None => *left,
            }
        }
    }

    fn tree_of(n: usize) -> MemoryTree {
        let mut tree = MemoryTree::new();
        for i in 0..n {
            tree.push(leaf_hash(&(i as u64).to_be_bytes()));
        }
        tree
    }

    proptest! {
        #[test]
        fn roots_agree_with_rs_merkle(n in 1usize..300) {
            let mut tree = tree_of(n);
            let reference = rs_merkle::MerkleTree::<Rfc6962>::from_leaves(tree.leaves()).root().unwrap();
            prop_assert_eq!(root(&mut tree, n as u64).unwrap(), reference);
            let mut frontier = Frontier::new();
            for leaf in tree.leaves() { frontier.push(*leaf); }
            prop_assert_eq!(frontier.root(), reference);
            let rebuilt = Frontier::from_parts(frontier.size(), frontier.hashes()).unwrap();
            prop_assert_eq!(rebuilt, frontier);
        }

        #[test]
        fn every_inclusion_proof_verifies_and_tampering_fails(n in 1u64..200, pick in any::<u64>(), flip in any::<usize>()) {
            let mut tree = tree_of(n as usize + 1);
            let r = root(&mut tree, n).unwrap();
            let index = pick % n;
            let proof = inclusion_proof(&mut tree, index, n).unwrap().unwrap();
            let leaf = tree.leaves()[index as usize];
            prop_assert!(verify_inclusion(index, n, &leaf, &proof, &r).is_ok());
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let i = flip % bad.len();
                bad[i][flip % 32] ^= 1;
                prop_assert!(verify_inclusion(index, n, &leaf, &bad, &r).is_err());
            }
            // The proof binds the (size, root) pair it was made for.
            let bigger = root(&mut tree, n + 1).unwrap();
            prop_assert!(verify_inclusion(index, n + 1, &leaf, &proof, &bigger).is_err());
            if n > 1 {
                prop_assert!(verify_inclusion((index + 1) % n, n, &leaf, &proof, &r).is_err());
            }
        }

        #[test]
        fn every_consistency_proof_verifies_and_tampering_fails(n in 1u64..200, pick in any::<u64>(), flip in any::<usize>()) {
            let mut tree = tree_of(n as usize + 1);
            let m = pick % n + 1;
            let (old_root, new_root) = (root(&mut tree, m).unwrap(), root(&mut tree, n).unwrap());
            let proof = consistency_proof(&mut tree, m, n).unwrap().unwrap();
            prop_assert!(verify_consistency(m, n, &old_root, &new_root, &proof).is_ok());
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let i = flip % bad.len();
                bad[i][flip % 32] ^= 1;
                prop_assert!(verify_consistency(m, n, &old_root, &new_root, &bad).is_err());
                let mut wrong_root = old_root;
                wrong_root[0] ^= 1;
                prop_assert!(verify_consistency(m, n, &wrong_root, &new_root, &proof).is_err());
            }
            let bigger = root(&mut tree, n + 1).unwrap();
            prop_assert!(verify_consistency(m, n + 1, &old_root, &bigger, &proof).is_err());
        }
    }
}
