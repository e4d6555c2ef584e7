//! Audit log retention: the archiver copies the region's log to a directory in the C2SP
//! tlog-tiles layout (a static log any tlog-tiles client can verify), and the pruner drops
//! archived entry bundles and level-0 tiles from the store.
//!
//! Invariants:
//! - Tiles and bundles are immutable once written: a full tile never changes, and a
//!   partial one is named by its width (`.p/W`). Every file is written to a temporary name,
//!   fsynced, renamed, and the directory fsynced: a reader never sees half a file. Only
//!   `checkpoint` is replaced, always after every file it covers.
//! - A bundle is pruned only after its archived copy was read back and hash-checked, and
//!   only below what every follower still needs: the SIEM exporter's cursor and each
//!   standby's confirmed audit position. The right edge (partial tiles, the frontier in
//!   the sequencer state) and all tiles above level 0 stay in the store.
//! - Reads of pruned tiles, bundles and proofs fall back to the archive.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arca_audit::merkle;
use arca_audit::tiles::{self, TILE_WIDTH};
use arca_store::{RangeOptions, StoreExt, Transaction, prefix_end};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::keys;
use crate::node::{Node, now_unix_ms};
use crate::sequencer::{RID_BUCKET_MS, RID_PAIR, follow, lease_view, rid_pair_index, write_lease};

/// How a node archives and prunes its region's log.
#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    pub dir: PathBuf,
    /// Sequenced entries kept in the store (rounded down to whole bundles of 256).
    pub retain_entries: u64,
    /// When set, bundles whose newest entry is younger than this stay in the store too.
    pub retain_for: Option<Duration>,
    pub interval: Duration,
}

/// The archiver's progress (region-local, in the store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveState {
    /// Full entry bundles (and level-0 tiles) archived and confirmed.
    pub archived_bundles: u64,
    /// Bundles dropped from the store.
    pub pruned_bundles: u64,
    /// The size of the checkpoint the archive's `checkpoint` file holds.
    pub archived_size: u64,
}

fn failpoint(point: &str) {
    if std::env::var("ARCA_FAILPOINT").is_ok_and(|p| p == point) {
        eprintln!("arcad: failpoint {point} reached: aborting");
        std::process::abort();
    }
}

pub fn load_state(tx: &mut dyn Transaction, region: &str) -> Result<ArchiveState, ApiError> {
    match tx.get(&keys::audit_archive(region))? {
        None => Ok(ArchiveState::default()),
        Some(raw) => serde_json::from_slice(&raw).map_err(|_| ApiError::Internal),
    }
}

/// Writes `data` at `dir/path` so that no reader sees a partial file.
fn write_atomic(dir: &Path, path: &str, data: &[u8]) -> std::io::Result<()> {
    let target = dir.join(path);
    let parent = target.parent().ok_or_else(|| std::io::Error::other("no parent"))?;
    std::fs::create_dir_all(parent)?;
    let mut name = [0u8; 6];
    rand::fill(&mut name);
    let tmp = parent.join(format!(".tmp-{}", hex::encode(name)));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &target)?;
    std::fs::File::open(parent)?.sync_all()
}

/// The archive's copy of a file, if there is one.
pub fn read_archived(dir: &Path, path: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(path)).ok()
}

/// A tile from the archive at `width` (a wider or full copy holds it as a prefix).
pub fn archived_tile(dir: &Path, level: u32, index: u64, width: u64) -> Option<Vec<u8>> {
    let need = (width * 32) as usize;
    [width, TILE_WIDTH].iter().find_map(|w| {
        let data = read_archived(dir, &tiles::tile_path(level, index, *w))?;
        (data.len() >= need).then(|| data[..need].to_vec())
    })
}

/// One archiver step: copies what is new, replaces the archive's checkpoint, then prunes.
/// `Ok(None)` when another node holds the archiver lease.
pub fn step(
    node: &Arc<Node>,
    holder: &str,
    config: &ArchiveConfig,
) -> Result<Option<ArchiveState>, ApiError> {
    // Pruned parts are read back from here (set once; a node archives to one place).
    node.archive_dir.set(config.dir.clone()).ok();
    let region = node.identity().region.clone();
    let lease = keys::audit_archive_lease(&region);
    let (n, r, h) = (node.clone(), region.clone(), holder.to_owned());
    let read = on_committer(node, move || {
        n.store.transact(|tx| -> Result<Option<(ArchiveState, crate::sequencer::LogHead)>, ApiError> {
            let (region, holder) = (&r, &h);
            let now = now_unix_ms();
            let (may, renew) = lease_view(tx, &lease, holder, now, 5000)?;
            if !may {
                return Ok(None);
            }
            if renew {
                write_lease(tx, &lease, holder, now + 5000)?;
            }
            Ok(Some((load_state(tx, region)?, follow::head(tx, region)?)))
        })
    })?;
    let Some((mut state, head)) = read.value else { return Ok(None) };
    if head.size == 0 {
        return Ok(Some(state));
    }
    let dir = &config.dir;
    let io = |e: std::io::Error| {
        tracing::error!(error = %e, "the audit archive cannot be written");
        ApiError::Unavailable
    };
    // Every tile the head's tree needs, at every level; existing files are immutable.
    let mut level = 0u32;
    loop {
        let count = head.size.div_ceil(TILE_WIDTH.pow(level + 1));
        let first = if level == 0 { state.archived_bundles } else { 0 };
        for index in first..count {
            let width = tiles::tile_width(level, index, head.size);
            if width == 0 {
                continue;
            }
            let path = tiles::tile_path(level, index, width);
            if dir.join(&path).exists() {
                continue;
            }
            let data = node.audit_tile(level, index, width)?.ok_or(ApiError::Internal)?;
            write_atomic(dir, &path, &data).map_err(io)?;
        }
        if head.size <= TILE_WIDTH.pow(level + 1) {
            break;
        }
        level += 1;
    }
    // Entry bundles: the full ones not yet archived, and the head's partial one.
    let full = head.size / TILE_WIDTH;
    for index in state.archived_bundles..=full {
        let width = (head.size - index * TILE_WIDTH).min(TILE_WIDTH);
        if width == 0 {
            continue;
        }
        let path = tiles::entries_path(index, width);
        if dir.join(&path).exists() {
            continue;
        }
        let data = node.audit_entries(index, width)?.ok_or(ApiError::Internal)?;
        write_atomic(dir, &path, &data).map_err(io)?;
    }
    failpoint("archive.after-files");
    write_atomic(dir, "checkpoint", head.checkpoint.as_bytes()).map_err(io)?;
    // Confirm the full bundles: re-read from the archive and hash-check against the
    // archived level-0 tile (which was itself copied from the store's tree).
    let mut confirmed = state.archived_bundles;
    while confirmed < full {
        let bundle =
            read_archived(dir, &tiles::entries_path(confirmed, TILE_WIDTH)).ok_or(ApiError::Internal)?;
        let tile = archived_tile(dir, 0, confirmed, TILE_WIDTH).ok_or(ApiError::Internal)?;
        let entries = tiles::bundle_entries(&bundle).map_err(|_| ApiError::Internal)?;
        let hashes = tiles::tile_hashes(&tile).map_err(|_| ApiError::Internal)?;
        let intact = entries.len() == hashes.len()
            && entries.iter().zip(&hashes).all(|(e, h)| merkle::leaf_hash(e) == *h)
            && node.audit_tile(0, confirmed, TILE_WIDTH)?.is_none_or(|stored| stored == tile);
        if !intact {
            tracing::error!(bundle = confirmed, "an archived bundle does not match its tile: not confirmed");
            return Err(ApiError::Internal);
        }
        confirmed += 1;
    }
    state.archived_bundles = confirmed;
    state.archived_size = head.size;
    // Prune below every follower and the retention.
    let mut limit = prune_limit(node, &state, head.size, config.retain_entries)?;
    if let Some(age) = config.retain_for {
        limit = limit.min(first_young_bundle(node, state.pruned_bundles, limit, age)?);
    }
    let pruned = prune(node, &region, &state, limit)?;
    state.pruned_bundles = pruned;
    let value = serde_json::to_vec(&state).map_err(|_| ApiError::Internal)?;
    let key = keys::audit_archive(&region);
    let n = node.clone();
    on_committer(node, move || n.store.transact(|tx| tx.set(&key, &value)).map_err(ApiError::from))?;
    Ok(Some(state))
}

/// The first bundle that must stay in the store: below the archive's confirmed bundles, the
/// retention, the SIEM exporter's cursor and every standby's confirmed audit position.
pub fn prune_limit(node: &Node, state: &ArchiveState, size: u64, retain: u64) -> Result<u64, ApiError> {
    let region = node.identity().region.clone();
    let followers = node.store.transact(|tx| -> Result<u64, ApiError> {
        let mut need = u64::MAX;
        if let Some(raw) = tx.get(&keys::siem_cursor(&region))? {
            let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| ApiError::Internal)?;
            need = need.min(v["next_index"].as_u64().unwrap_or(0));
        }
        if let Some(regions) = node.regions() {
            for peer in &regions.peers {
                // A standby that never confirmed a position holds everything.
                let pos = tx
                    .get(&crate::region::shipped_audit_key(&peer.region))?
                    .and_then(|raw| {
                        raw.get(..8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
                    })
                    .unwrap_or(0);
                need = need.min(pos);
            }
        }
        Ok(need)
    })?;
    let by_retention = size.saturating_sub(retain) / TILE_WIDTH;
    Ok(state.archived_bundles.min(by_retention).min(followers.value / TILE_WIDTH))
}

/// The first bundle in `from..to` whose newest entry is younger than `age`.
fn first_young_bundle(node: &Node, from: u64, to: u64, age: Duration) -> Result<u64, ApiError> {
    let cutoff = now_unix_ms().saturating_sub(age.as_millis() as u64);
    for n in from..to {
        // The bundle's newest entry is the one just before the next bundle's first.
        let bundle = node.audit_entries(n, TILE_WIDTH)?.ok_or(ApiError::Internal)?;
        let entries = tiles::bundle_entries(&bundle).map_err(|_| ApiError::Internal)?;
        let newest = entries.last().and_then(|e| arca_audit::Event::peek_time_unix_ms(e)).unwrap_or(u64::MAX);
        if newest >= cutoff {
            return Ok(n);
        }
    }
    Ok(to)
}

/// Drops bundles `state.pruned_bundles..limit` from the store (entries, level-0 tiles,
/// bundle index), one bundle per transaction. Returns the new count of pruned bundles.
fn prune(node: &Arc<Node>, region: &str, state: &ArchiveState, limit: u64) -> Result<u64, ApiError> {
    let mut pruned = state.pruned_bundles;
    while pruned < limit {
        let (node2, region, n) = (node.clone(), region.to_owned(), pruned);
        on_committer(node, move || prune_bundle(&node2, &region, n))?;
        pruned += 1;
    }
    Ok(pruned)
}

/// Runs `f` on the committer thread (between request batches: no fight for the store's
/// write lock).
fn on_committer<T: Send + 'static>(
    node: &Arc<Node>,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    node.committer().run_task(f).ok_or(ApiError::Unavailable)?
}

fn prune_bundle(node: &Node, region: &str, n: u64) -> Result<(), ApiError> {
    let events = keys::audit_events(region);
    let events_end = prefix_end(&events).ok_or(ApiError::Internal)?;
    {
        node.store.transact(|tx| -> Result<(), ApiError> {
            let Some(stamp) = tx.get(&keys::audit_bundle(region, n))? else { return Ok(()) };
            let mut begin = events.clone();
            begin.extend_from_slice(&stamp);
            let rows = tx.get_range(&begin, &events_end, RangeOptions::limit(TILE_WIDTH as usize))?;
            if rows.len() as u64 != TILE_WIDTH {
                return Err(ApiError::Internal);
            }
            let mut end = rows[rows.len() - 1].key.clone();
            end.push(0);
            tx.clear_range(&begin, &end)?;
            tx.clear(&keys::audit_tile(region, 0, n))?;
            tx.clear(&keys::audit_bundle(region, n))?;
            // The indexes that only serve these entries: batch starts up to the bundle's
            // last stamp; request ids (time-ordered) older than its newest entry; and the
            // checkpoints it completes (the followers got them with the entries).
            let last_stamp = &rows[rows.len() - 1].key[events.len()..];
            let batches = keys::audit_batches(region);
            let mut batches_end = batches.clone();
            batches_end.extend_from_slice(last_stamp);
            batches_end.push(0);
            tx.clear_range(&batches, &batches_end)?;
            if let Some(newest) = arca_audit::Event::peek_time_unix_ms(&rows[rows.len() - 1].value) {
                let rids = keys::audit_rid_prefix(region);
                let older = keys::audit_rid(region, &hex::encode(&newest.to_be_bytes()[2..]));
                tx.clear_range(&rids, &older)?;
                // The request-id pages up to the newest entry's time bucket lose the pairs
                // of the pruned entries (a request id is no later than its event's time; a
                // pair a clock skew between nodes leaves behind names an archived entry,
                // which proofs read from the archive, and goes with a later bundle).
                let pages = keys::audit_rid_pages(region);
                let upto = prefix_end(&keys::audit_rid_bucket(region, newest / RID_BUCKET_MS))
                    .ok_or(ApiError::Internal)?;
                let kept_from = (n + 1) * TILE_WIDTH;
                for page in tx.get_range(&pages, &upto, RangeOptions::default())? {
                    let kept: Vec<u8> = page
                        .value
                        .chunks_exact(RID_PAIR)
                        .filter(|pair| rid_pair_index(pair) >= kept_from)
                        .flatten()
                        .copied()
                        .collect();
                    if kept.is_empty() {
                        tx.clear(&page.key)?;
                    } else if kept.len() != page.value.len() {
                        tx.set(&page.key, &kept)?;
                    }
                }
            }
            let cps = keys::audit_checkpoints(region);
            tx.clear_range(&cps, &keys::audit_checkpoint_at(region, (n + 1) * TILE_WIDTH + 1))?;
            failpoint("archive.mid-prune");
            let mut s = load_state(tx, region)?;
            s.pruned_bundles = n + 1;
            tx.set(&keys::audit_archive(region), &serde_json::to_vec(&s).map_err(|_| ApiError::Internal)?)?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Runs the archiver on a thread until the node is dropped.
pub fn start(node: &Arc<Node>, config: ArchiveConfig) {
    let weak = Arc::downgrade(node);
    let mut instance = [0u8; 8];
    rand::fill(&mut instance);
    let holder = format!("{}:{}", node.identity().node, hex::encode(instance));
    std::thread::Builder::new()
        .name("arca-archiver".into())
        .spawn(move || {
            let mut outage = crate::outage::Outage::new("archive step", crate::outage::Level::Warn);
            loop {
                let Some(node) = weak.upgrade() else { break };
                let (n2, holder2, config2) = (node.clone(), holder.clone(), config.clone());
                let outcome = step(&n2, &holder2, &config2);
                drop((node, n2));
                match outcome {
                    Err(err) => {
                        outage.failed(err.code(), &err, None);
                    }
                    Ok(_) => {
                        outage.succeeded();
                    }
                }
                std::thread::sleep(config.interval);
            }
        })
        .expect("spawn the archiver thread");
}
