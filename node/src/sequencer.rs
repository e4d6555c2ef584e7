//! The sequencer: turns the region's event queue into a signed, append-only Merkle log.
//!
//! One node per region leads, through a lease in the store. Each step, the leader reads the
//! events after its cursor from a snapshot (versionstamp order is leaf order), assigns them
//! the next dense leaf indexes, appends their hashes to the level-0 tiles (and completed
//! subtrees to the tiles above), records where each entry bundle starts and signs a C2SP
//! checkpoint for the new size; then **one** store transaction writes all of it with the new
//! state, and only if the stored state is still the one the step started from. The
//! checkpoint is therefore durable exactly when the tiles it covers are, and it is only
//! served (published) from the store: a crash at any point before the commit leaves no
//! trace, a step computed from a state that moved on commits nothing, and a retry
//! re-integrates the same events in the same order — the log cannot fork, whoever leads.
//! The lease only keeps nodes from wasting work on conflicts.
//!
//! Entries stay where the request path wrote them (`("audit",region,"e",stamp)`); entry
//! bundles are read from there. The signing key is behind the barrier: a sealed node does
//! not sequence.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arca_audit::Event;
use arca_audit::checkpoint::Checkpoint;
use arca_audit::merkle::{self, Frontier, Hash};
use arca_audit::note::NoteSigner;
use arca_audit::tiles::{self, TILE_HEIGHT, TILE_WIDTH, TileHashSource, TileReader};
use arca_store::{KeyValue, RangeOptions, StoreError, StoreExt, Transaction, Versionstamp, prefix_end};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::ApiError;
use crate::keys;
use crate::node::{Node, now_unix_ms};

/// How a node sequences.
#[derive(Debug, Clone)]
pub struct SequencerConfig {
    /// Pause between steps when there is nothing to do. Default 100 ms. After a step that
    /// integrated entries the pause is an eighth of it (see [`next_pause`]).
    pub interval: Duration,
    /// Leadership lease. Default 2 s.
    pub lease_ttl: Duration,
    /// Most entries per checkpoint. Default 16384.
    pub max_batch: usize,
}

impl Default for SequencerConfig {
    fn default() -> Self {
        SequencerConfig {
            interval: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(2),
            max_batch: 16_384,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    size: u64,
    /// The frontier's hashes (hex), largest subtree first.
    frontier: Vec<String>,
    /// Hex of the last integrated event's 12-byte versionstamp.
    cursor: Option<String>,
    /// The last signed checkpoint.
    checkpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    holder: String,
    expires_unix_ms: u64,
}

/// The log's origin line and key name.
pub fn origin(cluster: &str, region: &str) -> String {
    format!("arca/{cluster}/{region}")
}

/// Aborts the process when `ARCA_FAILPOINT` names `point`: crash testing.
pub(crate) fn failpoint(point: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    if ARMED.get_or_init(|| std::env::var("ARCA_FAILPOINT").ok()).as_deref() == Some(point) {
        eprintln!("arcad: failpoint {point} reached: aborting");
        std::process::abort();
    }
}

/// What one step integrated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Integrated {
    pub first_index: u64,
    pub count: u64,
    pub size: u64,
    /// Milliseconds from each entry's event time to the commit of its checkpoint: (min, max).
    pub delay_ms: (u64, u64),
}

fn load_state(tx: &mut dyn Transaction, region: &str) -> Result<State, ApiError> {
    parse_state(tx.get(&keys::audit_state(region))?.as_deref())
}

fn parse_state(raw: Option<&[u8]>) -> Result<State, ApiError> {
    match raw {
        None => Ok(State::default()),
        Some(raw) => serde_json::from_slice(raw).map_err(|_| ApiError::Internal),
    }
}

fn frontier_of(state: &State) -> Result<Frontier, ApiError> {
    let hashes: Result<Vec<Hash>, _> = state
        .frontier
        .iter()
        .map(|h| hex::decode(h).ok().and_then(|b| b.try_into().ok()).ok_or(ApiError::Internal))
        .collect();
    Frontier::from_parts(state.size, hashes?).ok_or(ApiError::Internal)
}

/// The log's signer; created (and its vkey published) on first use. Needs the barrier open.
fn signer(node: &Node, tx: &mut dyn Transaction, origin: &str) -> Result<NoteSigner, ApiError> {
    let region = &node.identity().region;
    let key = keys::audit_signing_key(region);
    let seed = match tx.get(&key)? {
        Some(ct) => node.decrypt(&ct, &key)?,
        None => {
            let mut seed = Zeroizing::new(vec![0u8; 32]);
            rand::fill(&mut seed[..]);
            let ct = node.barrier().encrypt(&seed, &key)?;
            tx.set(&key, &ct)?;
            let signer = NoteSigner::from_seed(origin, &seed[..].try_into().map_err(|_| ApiError::Internal)?)
                .map_err(|_| ApiError::Internal)?;
            tx.set(&keys::audit_vkey(region), signer.verifier().vkey().as_bytes())?;
            seed
        }
    };
    let seed: Zeroizing<[u8; 32]> = Zeroizing::new(seed[..].try_into().map_err(|_| ApiError::Internal)?);
    NoteSigner::from_seed(origin, &seed).map_err(|_| ApiError::Internal)
}

/// Tiles of one region, read inside a transaction, at the widths a tree size needs.
struct StoreTiles<'a> {
    tx: &'a mut dyn Transaction,
    region: &'a str,
    /// Where pruned level-0 tiles are read from.
    archive: Option<&'a std::path::Path>,
}

impl TileReader for StoreTiles<'_> {
    type Error = ApiError;

    fn read_tile(&mut self, level: u32, index: u64, width: u64) -> Result<Vec<Hash>, ApiError> {
        let data = match self.tx.get(&keys::audit_tile(self.region, level, index))? {
            Some(data) => data,
            None => self
                .archive
                .and_then(|dir| crate::archive::archived_tile(dir, level, index, width))
                .ok_or(ApiError::Internal)?,
        };
        let need = (width * 32) as usize;
        if data.len() < need {
            return Err(ApiError::Internal);
        }
        tiles::tile_hashes(&data[..need]).map_err(|_| ApiError::Internal)
    }
}

/// What one committed step did: first index, count, new size, oldest and newest event time.
type Step = (u64, u64, u64, u64, u64);

/// The request-id index's time buckets ([`keys::audit_rid_page`]): 100 ms of request ids,
/// ~2,500 pairs at 25k requests/s, so a lookup reads ~60 KB.
pub const RID_BUCKET_MS: u64 = 100;
/// A page's pair: 16 bytes of request id, then the leaf index (big-endian u64).
pub const RID_PAIR: usize = 24;
/// Pairs per page: 98,304 bytes, under the store's 100,000-byte value limit.
const RID_PAGE_PAIRS: usize = 4096;

/// A request id's 16 bytes, when it is 32 hex digits (what the node's request ids are).
pub fn rid_bytes(request_id: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    if request_id.len() != 32 {
        return None;
    }
    hex::decode_to_slice(request_id, &mut out).ok()?;
    Some(out)
}

/// The time bucket of a request id: its first 48 bits are milliseconds.
pub fn rid_bucket(rid: &[u8; 16]) -> u64 {
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&rid[..6]);
    u64::from_be_bytes(ms) / RID_BUCKET_MS
}

/// The leaf index of a pair.
pub fn rid_pair_index(pair: &[u8]) -> u64 {
    let mut index = [0u8; 8];
    index.copy_from_slice(&pair[16..RID_PAIR]);
    u64::from_be_bytes(index)
}

/// The leaf index of the sequenced entry with `request_id` (the last one, should an id repeat):
/// from the pages of its time bucket, else from the per-entry index, which holds the entries
/// sequenced before the pages and ids that are not 16 bytes of hex.
pub fn rid_index(tx: &mut dyn Transaction, region: &str, request_id: &str) -> Result<Option<u64>, ApiError> {
    if let Some(rid) = rid_bytes(request_id) {
        let begin = keys::audit_rid_bucket(region, rid_bucket(&rid));
        let end = prefix_end(&begin).ok_or(ApiError::Internal)?;
        let mut found = None;
        for page in tx.get_range(&begin, &end, RangeOptions::default())? {
            for pair in page.value.chunks_exact(RID_PAIR) {
                if pair[..16] == rid {
                    found = Some(rid_pair_index(pair));
                }
            }
        }
        if found.is_some() {
            return Ok(found);
        }
    }
    match tx.get(&keys::audit_rid(region, request_id))? {
        Some(raw) => Ok(Some(u64::from_be_bytes(
            raw.get(..8).ok_or(ApiError::Internal)?.try_into().map_err(|_| ApiError::Internal)?,
        ))),
        None => Ok(None),
    }
}

/// One integration step. `Ok(None)`: not the leader, or nothing to integrate.
///
/// The step is computed on the calling thread from a snapshot, without the store's write
/// lock ([`prepare`]): reading the events, hashing them into the tree and the tiles, the
/// request-id pages, signing the checkpoint. Only its writes go through the committer thread
/// ([`apply`]), in a batch of requests' transaction: there they commit only if the log's state is still
/// the one the step was computed from, so a step can never fork the log, whoever else leads
/// or sequenced meanwhile (it is then dropped, and the next one starts from the new state).
/// Every request of the node waits out what runs on the committer thread: before this
/// split, the whole step did.
pub fn integrate(
    node: &Arc<Node>,
    holder: &str,
    config: &SequencerConfig,
) -> Result<Option<Integrated>, ApiError> {
    if node.barrier().is_sealed() {
        return Ok(None);
    }
    let Some(prepared) = prepare(node, holder, config)? else {
        return Ok(None);
    };
    let applied = apply(node, holder, config.lease_ttl.as_millis() as u64, prepared)?;
    failpoint("sequencer.after-commit");
    let Some((first_index, count, size, oldest_ms, newest_ms)) = applied else {
        return Ok(None);
    };
    let now = now_unix_ms();
    let delay_ms = (now.saturating_sub(newest_ms), now.saturating_sub(oldest_ms));
    node.metrics().observe_integration(count, delay_ms);
    tracing::debug!(first_index, count, size, "audit entries integrated");
    Ok(Some(Integrated { first_index, count, size, delay_ms }))
}

/// A step computed from a snapshot, to be committed by [`apply`].
#[derive(Debug)]
pub struct Prepared {
    /// The log's state the step extends, as stored (`None`: the log is empty).
    from_state: Option<Vec<u8>>,
    /// `None`: nothing to integrate, only the lease is due for renewal.
    step: Option<StagedStep>,
}

#[derive(Debug)]
struct StagedStep {
    writes: BTreeMap<Vec<u8>, Vec<u8>>,
    done: Step,
}

/// Computes the next step from a snapshot (no write lock is taken): `None` when this holder
/// may not lead, or has neither entries to integrate nor a lease to renew.
pub fn prepare(node: &Node, holder: &str, config: &SequencerConfig) -> Result<Option<Prepared>, ApiError> {
    let region = node.identity().region.clone();
    let origin = origin(&node.identity().cluster, &region);
    let events = keys::audit_events(&region);
    let events_end = prefix_end(&events).ok_or(ApiError::Internal)?;
    let ttl_ms = config.lease_ttl.as_millis() as u64;
    let lease_key = keys::audit_lease(&region);
    let prepared = node.store.transact(|tx| -> Result<Option<Prepared>, ApiError> {
        let (may_lead, renew) = lease_view(tx, &lease_key, holder, now_unix_ms(), ttl_ms)?;
        if !may_lead {
            return Ok(None);
        }
        let from_state = tx.get(&keys::audit_state(&region))?;
        let mut state = parse_state(from_state.as_deref())?;
        let begin = after_cursor(&events, &state)?;
        let batch = tx.get_range(&begin, &events_end, RangeOptions::limit(config.max_batch))?;
        if batch.is_empty() {
            return Ok(renew.then_some(Prepared { from_state, step: None }));
        }
        failpoint("sequencer.after-read");
        // The step's writes are staged here and read back by the step itself (the tiles it
        // extends twice, the signing key it creates on first use).
        let mut staged = Staged { tx, writes: BTreeMap::new() };
        let tx = &mut staged;

        let first_index = state.size;
        let mut frontier = frontier_of(&state)?;
        let mut touched: BTreeMap<(u32, u64), Vec<u8>> = BTreeMap::new();
        let rids = keys::audit_rid_prefix(&region);
        let mut pages: BTreeMap<u64, Vec<([u8; 16], u64)>> = BTreeMap::new();
        let mut oldest_ms = u64::MAX;
        let mut newest_ms = 0;
        for kv in &batch {
            let index = frontier.size();
            let stamp = &kv.key[events.len()..];
            if index % TILE_WIDTH == 0 {
                tx.set(&keys::audit_bundle(&region, index / TILE_WIDTH), stamp)?;
            }
            if let Some(t) = Event::peek_time_unix_ms(&kv.value) {
                oldest_ms = oldest_ms.min(t);
                newest_ms = newest_ms.max(t);
            }
            // Request id → leaf index, for inclusion proofs by request id. Indexed here, off
            // the request path, in one page per time bucket (a key per entry was most of a
            // step's time, which every request of the node waited out).
            if let Some(request_id) = Event::peek_request_id(&kv.value) {
                match rid_bytes(request_id) {
                    Some(rid) => pages.entry(rid_bucket(&rid)).or_default().push((rid, index)),
                    None => tx.set(&keys::audit_rid_under(&rids, request_id), &index.to_be_bytes())?,
                }
            }
            let leaf = merkle::leaf_hash(&kv.value);
            append_hash(tx, &region, &mut touched, 0, index, &leaf)?;
            for (level, sub_index, hash) in frontier.push(leaf) {
                if level % TILE_HEIGHT == 0 {
                    let tile_level = level / TILE_HEIGHT;
                    append_hash(tx, &region, &mut touched, tile_level, sub_index, &hash)?;
                }
            }
        }
        for ((level, index), data) in &touched {
            tx.set(&keys::audit_tile(&region, *level, *index), data)?;
        }
        for (bucket, pairs) in &pages {
            for chunk in pairs.chunks(RID_PAGE_PAIRS) {
                let mut page = Vec::with_capacity(chunk.len() * RID_PAIR);
                for (rid, index) in chunk {
                    page.extend_from_slice(rid);
                    page.extend_from_slice(&index.to_be_bytes());
                }
                tx.set(&keys::audit_rid_page(&region, *bucket, chunk[0].1), &page)?;
            }
        }
        failpoint("sequencer.after-tiles");

        let first_stamp = &batch[0].key[events.len()..];
        let mut batch_key = keys::audit_batches(&region);
        batch_key.extend_from_slice(first_stamp);
        tx.set(&batch_key, &first_index.to_be_bytes())?;

        let checkpoint = Checkpoint {
            origin: origin.clone(),
            size: frontier.size(),
            root: frontier.root(),
            extensions: vec![],
        };
        let signed = checkpoint.sign(&signer(node, tx, &origin)?).map_err(|_| ApiError::Internal)?;
        // Every checkpoint is kept, so followers (the SIEM exporter) publish each one.
        tx.set(&keys::audit_checkpoint_at(&region, frontier.size()), signed.as_bytes())?;
        failpoint("sequencer.after-sign");

        let last = batch.last().map(|kv| hex::encode(&kv.key[events.len()..]));
        state = State {
            size: frontier.size(),
            frontier: frontier.hashes().iter().map(hex::encode).collect(),
            cursor: last,
            checkpoint: signed,
        };
        tx.set(&keys::audit_state(&region), &serde_json::to_vec(&state).map_err(|_| ApiError::Internal)?)?;
        let done = (first_index, batch.len() as u64, frontier.size(), oldest_ms, newest_ms);
        Ok(Some(Prepared { from_state, step: Some(StagedStep { writes: staged.writes, done }) }))
    })?;
    Ok(prepared.value)
}

/// Commits a [`prepare`]d step in the committer's next batch (blocking the caller until it
/// committed): the lease is renewed, and the step's writes are made only if this holder
/// still leads and the log's state is still the one the step extends (`None` otherwise,
/// nothing written but the lease). The step shares the batch's commit and fsync.
pub fn apply(node: &Node, holder: &str, ttl_ms: u64, prepared: Prepared) -> Result<Option<Step>, ApiError> {
    let region = &node.identity().region;
    let (lease_key, state_key) = (keys::audit_lease(region), keys::audit_state(region));
    let holder = holder.to_owned();
    let Prepared { from_state, step } = prepared;
    // The outcome of the last attempt of the batch's transaction.
    let outcome = Arc::new(Mutex::new(None));
    let run = {
        let outcome = outcome.clone();
        Box::new(move |tx: &mut dyn Transaction| -> Result<(), StoreError> {
            let now = now_unix_ms();
            let result = (|| -> Result<Option<Step>, ApiError> {
                if !lease_view(tx, &lease_key, &holder, now, ttl_ms)?.0 {
                    return Ok(None);
                }
                write_lease(tx, &lease_key, &holder, now + ttl_ms)?;
                let Some(step) = &step else {
                    return Ok(None);
                };
                if tx.get(&state_key)? != from_state {
                    return Ok(None);
                }
                for (key, value) in &step.writes {
                    tx.set(key, value)?;
                }
                failpoint("sequencer.before-commit");
                Ok(Some(step.done))
            })();
            match result {
                // The transaction may hold part of the step's writes: the batch fails.
                Err(ApiError::Store(err)) => Err(err),
                other => {
                    *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(other);
                    Ok(())
                }
            }
        })
    };
    // A committer that is gone means the node is shutting down: nothing was written.
    match node.committer().join_batch(run) {
        Some(true) => outcome.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or(Ok(None)),
        // The batch failed (the committer logged why): nothing of the step was written.
        Some(false) => Err(ApiError::Unavailable),
        None => Err(ApiError::Internal),
    }
}

/// A step's transaction: reads go to the snapshot (or to what the step wrote), writes are
/// kept for [`apply`]. A step only reads points and the event queue, and only sets keys.
struct Staged<'a> {
    tx: &'a mut dyn Transaction,
    writes: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Transaction for Staged<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(value) => Ok(Some(value.clone())),
            None => self.tx.get(key),
        }
    }

    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(value) => Ok(Some(value.clone())),
            None => self.tx.get_snapshot(key),
        }
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        options: RangeOptions,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if self.writes.range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end))).next().is_some() {
            return Err(StoreError::Corrupt("a sequencer step read a range it wrote"));
        }
        self.tx.get_range(begin, end, options)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        // The store checks the limits when apply writes it.
        self.writes.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn clear(&mut self, _key: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::Corrupt("a sequencer step only sets keys"))
    }

    fn clear_range(&mut self, _begin: &[u8], _end: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::Corrupt("a sequencer step only sets keys"))
    }

    fn set_versionstamped_key(
        &mut self,
        _prefix: &[u8],
        _suffix: &[u8],
        _value: &[u8],
    ) -> Result<u16, StoreError> {
        Err(StoreError::Corrupt("a sequencer step only sets keys"))
    }

    fn maybe_committed(&self) -> bool {
        self.tx.maybe_committed()
    }

    fn commit(&mut self) -> Result<arca_store::CommitInfo, StoreError> {
        Err(StoreError::Corrupt("a sequencer step is committed by apply"))
    }

    fn on_error(&mut self, _err: &StoreError) -> Result<(), StoreError> {
        Err(StoreError::Corrupt("a sequencer step is committed by apply"))
    }
}

/// `(may lead, renewal due)` for `holder` of the lease at `key`: the lease is free, expired or ours; renew at
/// half-life, or when the configured TTL shrank below what is held.
pub fn lease_view(
    tx: &mut dyn Transaction,
    key: &[u8],
    holder: &str,
    now: u64,
    ttl_ms: u64,
) -> Result<(bool, bool), ApiError> {
    let lease: Option<Lease> = tx.get(key)?.and_then(|raw| serde_json::from_slice(&raw).ok());
    match lease {
        Some(l) if l.holder != holder && l.expires_unix_ms > now => Ok((false, false)),
        Some(l) if l.holder == holder => {
            Ok((true, l.expires_unix_ms < now + ttl_ms / 2 || l.expires_unix_ms > now + ttl_ms))
        }
        _ => Ok((true, true)),
    }
}

pub fn write_lease(
    tx: &mut dyn Transaction,
    key: &[u8],
    holder: &str,
    expires_unix_ms: u64,
) -> Result<(), ApiError> {
    let lease = Lease { holder: holder.to_owned(), expires_unix_ms };
    tx.set(key, &serde_json::to_vec(&lease).map_err(|_| ApiError::Internal)?)?;
    Ok(())
}

/// The first event key after the state's cursor.
fn after_cursor(events: &[u8], state: &State) -> Result<Vec<u8>, ApiError> {
    let mut begin = events.to_vec();
    if let Some(cursor) = &state.cursor {
        begin.extend_from_slice(&hex::decode(cursor).map_err(|_| ApiError::Internal)?);
        begin.push(0x00);
    }
    Ok(begin)
}

/// Appends `hash` as position `index` at tile level `level`, loading the right-edge tile from
/// the store the first time it is touched.
fn append_hash(
    tx: &mut dyn Transaction,
    region: &str,
    touched: &mut BTreeMap<(u32, u64), Vec<u8>>,
    level: u32,
    index: u64,
    hash: &Hash,
) -> Result<(), ApiError> {
    let tile_index = index / TILE_WIDTH;
    let offset = (index % TILE_WIDTH) as usize;
    let tile = match touched.entry((level, tile_index)) {
        std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::btree_map::Entry::Vacant(entry) => {
            let existing = if offset == 0 {
                Vec::new()
            } else {
                tx.get(&keys::audit_tile(region, level, tile_index))?.unwrap_or_default()
            };
            entry.insert(existing)
        }
    };
    if tile.len() != offset * 32 {
        tracing::error!(
            level,
            tile_index,
            offset,
            len = tile.len(),
            "audit tile does not end where the tree does"
        );
        return Err(ApiError::Internal);
    }
    tile.extend_from_slice(hash);
    Ok(())
}

/// Runs the sequencer on a thread until the node is dropped.
pub fn start(node: &Arc<Node>, config: SequencerConfig) {
    let weak: Weak<Node> = Arc::downgrade(node);
    let mut instance = [0u8; 8];
    rand::fill(&mut instance);
    let holder = format!("{}:{}", node.identity().node, hex::encode(instance));
    std::thread::Builder::new()
        .name("arca-sequencer".into())
        .spawn(move || {
            // A panic here is a bug in the log's own bookkeeping: crash rather than serve
            // requests whose events would never be sequenced.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sequence(&weak, &holder, &config)));
            if outcome.is_err() {
                eprintln!("arcad: the audit sequencer panicked; aborting");
                std::process::abort();
            }
        })
        .expect("spawn the sequencer thread");
}

fn sequence(weak: &Weak<Node>, holder: &str, config: &SequencerConfig) {
    let mut outage = crate::outage::Outage::new("sequencer step", crate::outage::Level::Warn);
    loop {
        let Some(node) = weak.upgrade() else { break };
        let started = Instant::now();
        // The step's writes commit on the committer thread, in its next batch of requests:
        // no fight for the store's write lock with this node's own request path.
        let outcome = integrate(&node, holder, config);
        drop(node);
        match &outcome {
            // A store error says more than the request-facing "storage unavailable".
            Err(ApiError::Store(err)) => {
                outage.failed(err.code(), err, None);
            }
            Err(ApiError::Unavailable) => {
                outage.failed(
                    "batch_failed",
                    &"the batch it joined did not commit (the committer's line says why)",
                    None,
                );
            }
            Err(err) => {
                outage.failed(err.code(), err, None);
            }
            Ok(_) => {
                outage.succeeded();
            }
        }
        match next_pause(outcome.as_ref().ok().and_then(Option::as_ref), config) {
            Some(pause) => std::thread::sleep(pause.saturating_sub(started.elapsed())),
            None => continue,
        }
    }
}

/// How long the sequencer waits after a step that integrated `done` (`None`: nothing, or
/// the step failed), from the step's start; `None`: go again at once.
///
/// A step's writes hold the committer thread — every request of its batch waits for them —
/// for a few sets per tile and page (the whole step did, at ~1 µs per
/// entry, before it was computed off that thread; 3 µs before the request-id index was
/// paged). Under load, steps an eighth of the idle interval apart keep each one short: at
/// 25k requests/s ~310 entries every 12.5 ms instead of ~2,500 every 100 ms. arca-bench, reads at 16
/// connections (before the paging): p99 ~3.5 ms at a quarter of the interval, ~2.4 ms at an
/// eighth, throughput unchanged; at 64 connections p99 ~5.9 → ~4.5 ms (p90 ~2.7 → ~3.2 ms).
/// The log is signed sooner too. An idle node still wakes once per interval.
pub fn next_pause(done: Option<&Integrated>, config: &SequencerConfig) -> Option<Duration> {
    match done {
        // A full batch: more may be waiting.
        Some(done) if done.count as usize >= config.max_batch => None,
        Some(_) => Some((config.interval / 8).max(Duration::from_millis(1))),
        None => Some(config.interval),
    }
}

/// What a follower of the log sees of its head: the size covered by the latest checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHead {
    pub size: u64,
    /// The latest signed checkpoint (empty before the first).
    pub checkpoint: String,
}

/// The sequenced log as its followers read it: straight from the store, in a transaction of
/// the caller's, with no barrier (entries, checkpoints and the verifier key are public).
pub mod follow {
    use super::*;

    /// An entry with its 12-byte versionstamp (its position in the event queue).
    pub type StampedEntry = (Vec<u8>, Vec<u8>);

    /// The head of `region`'s log.
    pub fn head(tx: &mut dyn Transaction, region: &str) -> Result<LogHead, ApiError> {
        let state = load_state(tx, region)?;
        Ok(LogHead { size: state.size, checkpoint: state.checkpoint })
    }

    /// Up to `limit` sequenced entries after the entry at `after` (a 12-byte versionstamp;
    /// `None`: from the first), never past `size`, the head the caller read: entries beyond
    /// it may not be sequenced yet. Returns `(versionstamp, entry)` pairs in leaf order.
    pub fn entries(
        tx: &mut dyn Transaction,
        region: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<StampedEntry>, ApiError> {
        let events = keys::audit_events(region);
        let end = prefix_end(&events).ok_or(ApiError::Internal)?;
        let mut begin = events.clone();
        if let Some(stamp) = after {
            begin.extend_from_slice(stamp);
            begin.push(0x00);
        }
        let rows = tx.get_range(&begin, &end, RangeOptions::limit(limit))?;
        Ok(rows.into_iter().map(|kv| (kv.key[events.len()..].to_vec(), kv.value)).collect())
    }

    /// The signed checkpoints with `after < size <= up_to`, in size order.
    pub fn checkpoints(
        tx: &mut dyn Transaction,
        region: &str,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, ApiError> {
        let begin = keys::audit_checkpoint_at(region, after.saturating_add(1));
        let end = keys::audit_checkpoint_at(region, up_to.saturating_add(1));
        let rows = tx.get_range(&begin, &end, RangeOptions::limit(limit))?;
        let prefix_len = keys::audit_checkpoints(region).len();
        rows.into_iter()
            .map(|kv| {
                let elements =
                    arca_store::tuple::unpack(&kv.key[prefix_len..]).map_err(|_| ApiError::Internal)?;
                let size = match elements.as_slice() {
                    [arca_store::tuple::Element::Int(n)] => n.as_u64().ok_or(ApiError::Internal)?,
                    _ => return Err(ApiError::Internal),
                };
                let note = String::from_utf8(kv.value).map_err(|_| ApiError::Internal)?;
                Ok((size, note))
            })
            .collect()
    }

    /// The log's verifier key, once the sequencer created it.
    pub fn vkey(tx: &mut dyn Transaction, region: &str) -> Result<Option<String>, ApiError> {
        Ok(tx.get(&keys::audit_vkey(region))?.map(|r| String::from_utf8_lossy(&r).into_owned()))
    }
}

/// Which leaf an inclusion proof is for.
#[derive(Debug, Clone)]
pub enum LeafRef {
    Index(u64),
    RequestId(String),
    /// The 12-byte audit position a reply carried.
    Position(Versionstamp),
}

/// An inclusion proof against the latest signed checkpoint.
#[derive(Debug, Clone)]
pub struct InclusionProof {
    pub index: u64,
    pub size: u64,
    pub hashes: Vec<Hash>,
    pub checkpoint: String,
    /// The entry itself (the encoded event).
    pub entry: Vec<u8>,
}

/// A consistency proof between two sizes.
#[derive(Debug, Clone)]
pub struct ConsistencyProof {
    pub old_size: u64,
    pub new_size: u64,
    pub hashes: Vec<Hash>,
}

impl Node {
    /// The latest signed checkpoint of this node's region, if any.
    pub fn audit_checkpoint(&self) -> Result<Option<String>, ApiError> {
        let region = self.identity().region.clone();
        let state = self.store.transact(|tx| load_state(tx, &region))?.value;
        Ok((!state.checkpoint.is_empty()).then_some(state.checkpoint))
    }

    /// The log's verifier key, once the sequencer created it.
    pub fn audit_vkey(&self) -> Result<Option<String>, ApiError> {
        let key = keys::audit_vkey(&self.identity().region);
        let raw = self.store.transact(|tx| tx.get(&key))?.value;
        Ok(raw.map(|r| String::from_utf8_lossy(&r).into_owned()))
    }

    /// Hash tile `(level, index)` at `width` hashes, if the log is that far.
    pub fn audit_tile(&self, level: u32, index: u64, width: u64) -> Result<Option<Vec<u8>>, ApiError> {
        let key = keys::audit_tile(&self.identity().region, level, index);
        let raw = self.store.transact(|tx| tx.get(&key))?.value;
        let need = (width * 32) as usize;
        let stored = raw.filter(|r| r.len() >= need).map(|mut r| {
            r.truncate(need);
            r
        });
        // Pruned from the store: the archive has it.
        Ok(stored.or_else(|| {
            self.archive_dir.get().and_then(|d| crate::archive::archived_tile(d, level, index, width))
        }))
    }

    /// Entry bundle `index` with `width` entries, if the log is that far.
    pub fn audit_entries(&self, index: u64, width: u64) -> Result<Option<Vec<u8>>, ApiError> {
        let region = self.identity().region.clone();
        let read = self.store.transact(|tx| {
            let state = load_state(tx, &region)?;
            if state.size < index * TILE_WIDTH + width {
                return Ok::<_, ApiError>(None);
            }
            let Some(stamp) = tx.get(&keys::audit_bundle(&region, index))? else { return Ok(None) };
            let mut begin = keys::audit_events(&region);
            let end = prefix_end(&begin).ok_or(ApiError::Internal)?;
            begin.extend_from_slice(&stamp);
            Ok(Some(tx.get_range(&begin, &end, RangeOptions::limit(width as usize))?))
        })?;
        let rows = read.value.unwrap_or_default();
        if rows.len() as u64 != width {
            // Pruned from the store: the archive has it.
            return Ok(self
                .archive_dir
                .get()
                .and_then(|d| crate::archive::read_archived(d, &tiles::entries_path(index, width))));
        }
        let mut bundle = Vec::new();
        for row in rows {
            tiles::bundle_push(&mut bundle, &row.value).map_err(|_| ApiError::Internal)?;
        }
        Ok(Some(bundle))
    }

    /// An inclusion proof for one entry against the latest checkpoint.
    pub fn audit_inclusion_proof(&self, leaf: LeafRef) -> Result<InclusionProof, ApiError> {
        let region = self.identity().region.clone();
        let events = keys::audit_events(&region);
        let proof = self.store.transact(|tx| {
            let state = load_state(tx, &region)?;
            if state.size == 0 {
                return Err(ApiError::NotFound("the log has no checkpoint yet".into()));
            }
            let index = match &leaf {
                LeafRef::Index(i) => *i,
                LeafRef::RequestId(id) => {
                    if id.len() > 128 {
                        return Err(ApiError::invalid("request id too long"));
                    }
                    rid_index(tx, &region, id)?.ok_or_else(|| {
                        ApiError::NotFound("no sequenced audit event with that request id".into())
                    })?
                }
                LeafRef::Position(stamp) => position_index(tx, &region, &state, *stamp)?,
            };
            if index >= state.size {
                return Err(ApiError::NotFound("that entry is not yet covered by a checkpoint".into()));
            }
            let size = state.size;
            let mut source = TileHashSource::new(
                StoreTiles { tx, region: &region, archive: self.archive_dir.get().map(|p| p.as_path()) },
                size,
            );
            let hashes = merkle::inclusion_proof(&mut source, index, size)
                .map_err(|_| ApiError::Internal)?
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            // The entry itself, from its bundle (in the archive once pruned).
            let Some(stamp) = tx.get(&keys::audit_bundle(&region, index / TILE_WIDTH))? else {
                let dir = self.archive_dir.get().ok_or(ApiError::Internal)?;
                let bundle =
                    crate::archive::read_archived(dir, &tiles::entries_path(index / TILE_WIDTH, TILE_WIDTH))
                        .ok_or(ApiError::Internal)?;
                let entries = tiles::bundle_entries(&bundle).map_err(|_| ApiError::Internal)?;
                let entry = entries.get((index % TILE_WIDTH) as usize).ok_or(ApiError::Internal)?.to_vec();
                return Ok(InclusionProof { index, size, hashes, checkpoint: state.checkpoint, entry });
            };
            let mut begin = events.clone();
            begin.extend_from_slice(&stamp);
            let end = prefix_end(&events).ok_or(ApiError::Internal)?;
            let rows = tx.get_range(&begin, &end, RangeOptions::limit((index % TILE_WIDTH + 1) as usize))?;
            let entry = rows.last().ok_or(ApiError::Internal)?.value.clone();
            Ok(InclusionProof { index, size, hashes, checkpoint: state.checkpoint, entry })
        })?;
        Ok(proof.value)
    }

    /// A consistency proof from `old_size` to the latest checkpoint's size (or `new_size`).
    pub fn audit_consistency_proof(
        &self,
        old_size: u64,
        new_size: Option<u64>,
    ) -> Result<ConsistencyProof, ApiError> {
        let region = self.identity().region.clone();
        let proof = self.store.transact(|tx| {
            let state = load_state(tx, &region)?;
            let new = new_size.unwrap_or(state.size);
            if new > state.size || old_size > new {
                return Err(ApiError::invalid(format!("sizes must satisfy old <= new <= {}", state.size)));
            }
            let mut source = TileHashSource::new(
                StoreTiles { tx, region: &region, archive: self.archive_dir.get().map(|p| p.as_path()) },
                new,
            );
            let hashes = merkle::consistency_proof(&mut source, old_size, new)
                .map_err(|_| ApiError::Internal)?
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            Ok(ConsistencyProof { old_size, new_size: new, hashes })
        })?;
        Ok(proof.value)
    }
}

/// The leaf index of the event at `stamp`: the first index of its batch plus its rank there.
fn position_index(
    tx: &mut dyn Transaction,
    region: &str,
    state: &State,
    stamp: Versionstamp,
) -> Result<u64, ApiError> {
    if let Some(cursor) = &state.cursor
        && hex::decode(cursor).map_err(|_| ApiError::Internal)?.as_slice() < stamp.as_bytes().as_slice()
    {
        return Err(ApiError::NotFound("that entry is not yet covered by a checkpoint".into()));
    }
    let batches = keys::audit_batches(region);
    let mut upto = batches.clone();
    upto.extend_from_slice(stamp.as_bytes());
    upto.push(0x00);
    let rows = tx.get_range(&batches, &upto, RangeOptions::limit(1).reversed())?;
    let row = rows.first().ok_or_else(|| ApiError::NotFound("no entry at that position".into()))?;
    let first_index = u64::from_be_bytes(row.value[..8].try_into().map_err(|_| ApiError::Internal)?);
    let events = keys::audit_events(region);
    let mut begin = events.clone();
    begin.extend_from_slice(&row.key[batches.len()..]);
    let mut end = events;
    end.extend_from_slice(stamp.as_bytes());
    end.push(0x00);
    let within = tx.get_range(&begin, &end, RangeOptions::default())?;
    match within.last() {
        Some(last) if last.key.ends_with(stamp.as_bytes()) => Ok(first_index + within.len() as u64 - 1),
        _ => Err(ApiError::NotFound("no entry at that position".into())),
    }
}
