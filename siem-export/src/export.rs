//! The exporter: follows a region's sequenced log and publishes it to Kafka.
//!
//! Invariants:
//! - Only sequenced entries are published (never past the latest checkpoint's size), each
//!   as one OCSF message keyed by the log's origin with its leaf index in a header, in leaf
//!   order on one partition; every signed checkpoint goes to the checkpoints topic after
//!   the entries it covers were acknowledged.
//! - The cursor (`("siem",region,"cursor")`) advances only after the broker acknowledged
//!   every message of a round: at-least-once. A crash or a lost lease may repeat a round;
//!   consumers drop repeats by leaf index.
//! - One active exporter per region: a lease in the store, checked again in the cursor's
//!   own transaction, so a deposed exporter cannot move the cursor.
//! - The exporter only reads the node's data and writes its own two keys: a broker outage
//!   never touches the request path; lag grows and is reported instead.
//! - After a broker failure, what was acknowledged in the [`RESEND_WINDOW_MS`] before it is
//!   published again: a crashing broker may lose writes it had acknowledged (storage
//!   flushed after the ack, idempotence state ahead of the data). Found by the chaos
//!   broker-stop scenario; consumers drop the repeats by leaf index.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arca_audit::Event;
use arca_audit::checkpoint::Checkpoint;
use arca_node::error::ApiError;
use arca_node::keys;
use arca_node::node::now_unix_ms;
use arca_node::outage::{Level, Outage};
use arca_node::sequencer::{follow, lease_view, write_lease};
use arca_store::{Store, StoreExt, Transaction};
use hdrhistogram::Histogram;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// Acknowledged rounds this recent before a broker failure are published again.
pub const RESEND_WINDOW_MS: u64 = 10_000;
use serde::{Deserialize, Serialize};

use crate::config::{ExportSection, KafkaSection};
use crate::kafka::{self, LEAF_INDEX_HEADER};
use crate::ocsf;

/// Where the exporter is: the next leaf index to publish, the versionstamp of the last
/// published entry, and the size of the last published checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub next_index: u64,
    /// Hex of the last published entry's versionstamp.
    pub stamp: Option<String>,
    pub checkpoint_size: u64,
}

/// Reads the exporter's cursor of `region`.
pub fn read_cursor(store: &dyn Store, region: &str) -> Result<Cursor, ApiError> {
    Ok(store.transact(|tx| load_cursor(tx, region))?.value)
}

fn load_cursor(tx: &mut dyn Transaction, region: &str) -> Result<Cursor, ApiError> {
    match tx.get(&keys::siem_cursor(region))? {
        None => Ok(Cursor::default()),
        Some(raw) => serde_json::from_slice(&raw).map_err(|_| ApiError::Internal),
    }
}

/// Counters and gauges, served on `/metrics`.
#[derive(Debug)]
pub struct ExportMetrics {
    pub leader: AtomicU64,
    pub head_size: AtomicU64,
    pub next_index: AtomicU64,
    /// Milliseconds since the oldest unpublished entry was recorded (0 when caught up).
    pub lag_ms: AtomicU64,
    pub delivered: AtomicU64,
    pub checkpoints: AtomicU64,
    pub failures: AtomicU64,
    /// Times a broker failure made the exporter publish recent rounds again.
    pub resent_rounds: AtomicU64,
    /// Access-to-Kafka latency: event time to the broker's acknowledgement, ms.
    pub latency_ms: Mutex<Histogram<u64>>,
}

impl Default for ExportMetrics {
    fn default() -> Self {
        ExportMetrics {
            leader: AtomicU64::new(0),
            head_size: AtomicU64::new(0),
            next_index: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            resent_rounds: AtomicU64::new(0),
            latency_ms: Mutex::new(Histogram::new_with_bounds(1, 3_600_000, 3).expect("histogram bounds")),
        }
    }
}

impl ExportMetrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lag_entries = g(&self.head_size).saturating_sub(g(&self.next_index));
        let h = self.latency_ms.lock().unwrap_or_else(|p| p.into_inner());
        let q = |p: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(p) as f64 / 1000.0 };
        format!(
            "# HELP arca_siem_export_leader 1 while this exporter holds the region's lease.\n\
             # TYPE arca_siem_export_leader gauge\narca_siem_export_leader {}\n\
             # HELP arca_siem_export_lag_entries Sequenced entries not yet acknowledged by Kafka.\n\
             # TYPE arca_siem_export_lag_entries gauge\narca_siem_export_lag_entries {}\n\
             # HELP arca_siem_export_lag_seconds Age of the oldest sequenced entry not yet acknowledged.\n\
             # TYPE arca_siem_export_lag_seconds gauge\narca_siem_export_lag_seconds {}\n\
             # HELP arca_siem_export_next_index The next leaf index to publish.\n\
             # TYPE arca_siem_export_next_index gauge\narca_siem_export_next_index {}\n\
             # HELP arca_siem_export_entries_total Entries acknowledged by Kafka.\n\
             # TYPE arca_siem_export_entries_total counter\narca_siem_export_entries_total {}\n\
             # HELP arca_siem_export_checkpoints_total Checkpoints acknowledged by Kafka.\n\
             # TYPE arca_siem_export_checkpoints_total counter\narca_siem_export_checkpoints_total {}\n\
             # HELP arca_siem_export_failures_total Delivery rounds that failed and were retried.\n\
             # TYPE arca_siem_export_failures_total counter\narca_siem_export_failures_total {}\n\
             # HELP arca_siem_export_resends_total Broker failures answered by publishing recent rounds again.\n\
             # TYPE arca_siem_export_resends_total counter\narca_siem_export_resends_total {}\n\
             # HELP arca_siem_export_latency_seconds Event time to Kafka acknowledgement.\n\
             # TYPE arca_siem_export_latency_seconds summary\n\
             arca_siem_export_latency_seconds{{quantile=\"0.5\"}} {}\n\
             arca_siem_export_latency_seconds{{quantile=\"0.99\"}} {}\n\
             arca_siem_export_latency_seconds{{quantile=\"1\"}} {}\n\
             arca_siem_export_latency_seconds_count {}\n",
            g(&self.leader),
            lag_entries,
            g(&self.lag_ms) as f64 / 1000.0,
            g(&self.next_index),
            g(&self.delivered),
            g(&self.checkpoints),
            g(&self.failures),
            g(&self.resent_rounds),
            q(0.5),
            q(0.99),
            q(1.0),
            h.len(),
        )
    }
}

/// Keeps the lag gauges current: the log's size, and the age of the oldest sequenced entry
/// the cursor has not passed. Reads only.
async fn watch_lag(store: Arc<dyn Store>, region: String, metrics: Arc<ExportMetrics>, every: Duration) {
    loop {
        let (store2, region2) = (store.clone(), region.clone());
        let read = tokio::task::spawn_blocking(move || {
            store2.transact(|tx| -> Result<(u64, u64, Option<u64>), ApiError> {
                let head = follow::head(tx, &region2)?;
                let cursor = load_cursor(tx, &region2)?;
                let oldest = if cursor.next_index < head.size {
                    let stamp = cursor
                        .stamp
                        .as_deref()
                        .map(hex::decode)
                        .transpose()
                        .map_err(|_| ApiError::Internal)?;
                    follow::entries(tx, &region2, stamp.as_deref(), 1)?
                        .first()
                        .and_then(|(_, e)| Event::peek_time_unix_ms(e))
                } else {
                    None
                };
                Ok((head.size, cursor.next_index, oldest))
            })
        })
        .await;
        if let Ok(Ok(read)) = read {
            let (size, next, oldest) = read.value;
            metrics.head_size.store(size, Ordering::Relaxed);
            metrics.next_index.store(next, Ordering::Relaxed);
            metrics.lag_ms.store(oldest.map_or(0, |t| now_unix_ms().saturating_sub(t)), Ordering::Relaxed);
        }
        tokio::time::sleep(every).await;
    }
}

/// What a round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing new, or another exporter holds the lease: wait a poll interval.
    Idle,
    /// Published `entries` (and checkpoints); `full`: a whole batch, more is waiting.
    Published { entries: usize, full: bool },
}

/// What one round read from the store.
struct Round {
    head_size: u64,
    /// The latest signed checkpoint: names the log's origin.
    head_checkpoint: String,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    checkpoints: Vec<(u64, String)>,
}

/// The exporter of one region.
pub struct Exporter {
    store: Arc<dyn Store>,
    region: String,
    kafka: KafkaSection,
    settings: ExportSection,
    holder: String,
    metrics: Arc<ExportMetrics>,
    producer: Option<FutureProducer<kafka::BrokerWatch>>,
    topics_ready: bool,
    origin: Option<String>,
    watch: kafka::BrokerWatch,
    /// The last broker failure already answered with a re-send.
    handled_failure_ms: u64,
    /// (commit time, the cursor before the round) of recently acknowledged rounds.
    recent: std::collections::VecDeque<(u64, Cursor)>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").field("region", &self.region).field("holder", &self.holder).finish()
    }
}

/// Why a round did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("store: {0}")]
    Store(#[from] ApiError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the lease moved to another exporter")]
    LostLease,
    #[error("the log's checkpoint is malformed")]
    BadCheckpoint,
}

impl ExportError {
    /// A stable, machine-readable code for logs.
    pub fn code(&self) -> &'static str {
        match self {
            ExportError::Store(err) => err.code(),
            ExportError::Kafka(_) => "kafka",
            ExportError::LostLease => "lost_lease",
            ExportError::BadCheckpoint => "bad_checkpoint",
        }
    }
}

impl Exporter {
    pub fn new(
        store: Arc<dyn Store>,
        region: String,
        kafka: KafkaSection,
        settings: ExportSection,
        metrics: Arc<ExportMetrics>,
    ) -> Exporter {
        let mut instance = [0u8; 8];
        rand::fill(&mut instance);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "exporter".into());
        let holder = format!("{host}:{}:{}", std::process::id(), hex::encode(instance));
        Exporter {
            store,
            region,
            kafka,
            settings,
            holder,
            metrics,
            producer: None,
            topics_ready: false,
            origin: None,
            watch: kafka::BrokerWatch::default(),
            handled_failure_ms: 0,
            recent: std::collections::VecDeque::new(),
        }
    }

    /// Runs until `stop` resolves. Errors are retried with backoff; they never end the loop.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        // Lag is measured beside the delivery loop, so it keeps growing while a round is
        // stuck on an unavailable broker.
        let lag = tokio::spawn(watch_lag(
            self.store.clone(),
            self.region.clone(),
            self.metrics.clone(),
            self.settings.poll_interval(),
        ));
        let mut backoff = self.settings.poll_interval();
        // A broker down for an hour is a line when it goes, one per 10 s, and one when it is
        // back: not one per retry.
        let mut outage = Outage::new("export round", Level::Warn);
        loop {
            let round = self.round().await;
            if round.is_ok() {
                outage.succeeded();
            }
            let pause = match round {
                Ok(Progress::Published { .. }) => {
                    backoff = self.settings.poll_interval();
                    Duration::ZERO
                }
                Ok(Progress::Idle) => {
                    backoff = self.settings.poll_interval();
                    self.settings.poll_interval()
                }
                Err(err) => {
                    self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    outage.failed(err.code(), &err, None);
                    if matches!(err, ExportError::Kafka(_)) {
                        // A failed round leaves the idempotent producer's sequence state
                        // unknown to the broker (after a timeout librdkafka bumps the epoch,
                        // which a restarted broker may answer with ProducerFenced): start
                        // the next round with a new producer. Repeats are possible, never gaps.
                        self.producer = None;
                    }
                    let pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_millis(self.settings.max_backoff_ms));
                    pause
                }
            };
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        lag.abort();
        if let Some(p) = &self.producer {
            let _ = p.flush(Duration::from_secs(2));
        }
    }

    /// One round: take or renew the lease, publish what is new.
    pub async fn round(&mut self) -> Result<Progress, ExportError> {
        self.resend_after_broker_failure().await?;
        let Some((cursor, round)) = self.read_round().await? else {
            self.metrics.leader.store(0, Ordering::Relaxed);
            return Ok(Progress::Idle);
        };
        self.metrics.leader.store(1, Ordering::Relaxed);
        self.metrics.head_size.store(round.head_size, Ordering::Relaxed);
        self.metrics.next_index.store(cursor.next_index, Ordering::Relaxed);
        let oldest = round.entries.first().and_then(|(_, e)| Event::peek_time_unix_ms(e));
        self.metrics.lag_ms.store(oldest.map_or(0, |t| now_unix_ms().saturating_sub(t)), Ordering::Relaxed);
        if round.entries.is_empty() && round.checkpoints.is_empty() {
            return Ok(Progress::Idle);
        }
        let full = round.entries.len() >= self.settings.batch_entries;
        let origin = match &self.origin {
            Some(o) => o.clone(),
            None => {
                let body = arca_audit::note::unverified_text(&round.head_checkpoint).unwrap_or_default();
                // The store's own checkpoint: its first line names the log.
                let origin = Checkpoint::parse(body).map_err(|_| ExportError::BadCheckpoint)?.origin;
                self.origin = Some(origin.clone());
                origin
            }
        };
        self.publish(&origin, &cursor, &round).await?;
        let next = Cursor {
            next_index: cursor.next_index + round.entries.len() as u64,
            stamp: round.entries.last().map(|(s, _)| hex::encode(s)).or(cursor.stamp.clone()),
            checkpoint_size: round.checkpoints.last().map_or(cursor.checkpoint_size, |(s, _)| *s),
        };
        self.commit_cursor(&next).await?;
        let now = now_unix_ms();
        self.recent.push_back((now, cursor.clone()));
        while self.recent.front().is_some_and(|(t, _)| t + 2 * RESEND_WINDOW_MS < now)
            || self.recent.len() > 100_000
        {
            self.recent.pop_front();
        }
        self.metrics.next_index.store(next.next_index, Ordering::Relaxed);
        self.metrics.lag_ms.store(0, Ordering::Relaxed);
        Ok(Progress::Published { entries: round.entries.len(), full })
    }

    /// After a broker failure: moves the cursor back to before the rounds acknowledged in
    /// the [`RESEND_WINDOW_MS`] preceding it (and since), so they are published again.
    async fn resend_after_broker_failure(&mut self) -> Result<(), ExportError> {
        let failed_at = self.watch.failed_at_ms.load(Ordering::SeqCst);
        if failed_at <= self.handled_failure_ms {
            return Ok(());
        }
        self.handled_failure_ms = failed_at;
        let from = failed_at.saturating_sub(RESEND_WINDOW_MS);
        if let Some((_, rewind)) = self.recent.iter().find(|(t, _)| *t >= from).cloned() {
            tracing::warn!(
                from_index = rewind.next_index,
                "a broker failed: publishing again what it acknowledged just before"
            );
            self.commit_cursor(&rewind).await?;
            self.metrics.resent_rounds.fetch_add(1, Ordering::Relaxed);
        }
        self.recent.clear();
        Ok(())
    }

    /// Takes or renews the lease and reads the next batch; `None` when another exporter
    /// holds the lease.
    async fn read_round(&self) -> Result<Option<(Cursor, Round)>, ExportError> {
        let store = self.store.clone();
        let (region, holder) = (self.region.clone(), self.holder.clone());
        let (ttl, batch) = (self.settings.lease_ttl_ms, self.settings.batch_entries);
        let read = tokio::task::spawn_blocking(move || {
            store.transact(|tx| -> Result<Option<(Cursor, Round)>, ApiError> {
                let lease_key = keys::siem_lease(&region);
                let now = now_unix_ms();
                let (may_lead, renew) = lease_view(tx, &lease_key, &holder, now, ttl)?;
                if !may_lead {
                    return Ok(None);
                }
                if renew {
                    write_lease(tx, &lease_key, &holder, now + ttl)?;
                }
                let cursor = load_cursor(tx, &region)?;
                let head = follow::head(tx, &region)?;
                let want = head.size.saturating_sub(cursor.next_index).min(batch as u64) as usize;
                let stamp =
                    cursor.stamp.as_deref().map(hex::decode).transpose().map_err(|_| ApiError::Internal)?;
                let entries = if want == 0 {
                    Vec::new()
                } else {
                    follow::entries(tx, &region, stamp.as_deref(), want)?
                };
                if entries.len() != want {
                    tracing::error!(
                        want,
                        got = entries.len(),
                        "the log has fewer entries than its head says"
                    );
                    return Err(ApiError::Internal);
                }
                let up_to = cursor.next_index + entries.len() as u64;
                let checkpoints = follow::checkpoints(tx, &region, cursor.checkpoint_size, up_to, 10_000)?;
                Ok(Some((
                    cursor,
                    Round { head_size: head.size, head_checkpoint: head.checkpoint, entries, checkpoints },
                )))
            })
        })
        .await
        .map_err(|_| ApiError::Internal)??;
        Ok(read.value)
    }

    async fn publish(&mut self, origin: &str, cursor: &Cursor, round: &Round) -> Result<(), ExportError> {
        let timeout = Duration::from_millis(self.settings.delivery_timeout_ms);
        if !self.topics_ready {
            let topics = [self.kafka.entries_topic.as_str(), self.kafka.checkpoints_topic.as_str()];
            kafka::ensure_topics(&self.kafka, &topics, timeout).await?;
            self.topics_ready = true;
        }
        if self.producer.is_none() {
            self.producer = Some(kafka::producer(&self.kafka, timeout, self.watch.clone())?);
        }
        let producer = self.producer.as_ref().expect("just created");
        let mut pending = Vec::with_capacity(round.entries.len());
        let mut times = Vec::with_capacity(round.entries.len());
        for (i, (_, entry)) in round.entries.iter().enumerate() {
            let index = cursor.next_index + i as u64;
            let event = Event::decode(entry).map_err(|_| {
                tracing::error!(index, "a sequenced entry does not decode");
                ApiError::Internal
            })?;
            times.push(event.time_unix_ms);
            let payload = ocsf::ocsf(origin, index, entry, &event).to_json();
            let index_text = index.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: LEAF_INDEX_HEADER, value: Some(index_text.as_str()) });
            let record = FutureRecord::to(&self.kafka.entries_topic)
                .key(origin)
                .payload(payload.as_str())
                .headers(headers)
                .timestamp(event.time_unix_ms as i64);
            pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        for (i, delivery) in pending.into_iter().enumerate() {
            match delivery.await {
                Ok(Ok(_)) => {
                    let ms = now_unix_ms().saturating_sub(times[i]).max(1);
                    self.metrics.latency_ms.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(ms);
                }
                Ok(Err((err, _))) => return Err(err.into()),
                Err(_) => return Err(rdkafka::error::KafkaError::Canceled.into()),
            }
        }
        self.metrics.delivered.fetch_add(round.entries.len() as u64, Ordering::Relaxed);
        // Checkpoints after the entries they cover were acknowledged.
        let mut pending = Vec::with_capacity(round.checkpoints.len());
        for (size, note) in &round.checkpoints {
            let size_text = size.to_string();
            let headers =
                OwnedHeaders::new().insert(Header { key: "arca-tree-size", value: Some(size_text.as_str()) });
            let record = FutureRecord::to(&self.kafka.checkpoints_topic)
                .key(origin)
                .payload(note.as_str())
                .headers(headers);
            pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => return Err(err.into()),
                Err(_) => return Err(rdkafka::error::KafkaError::Canceled.into()),
            }
        }
        self.metrics.checkpoints.fetch_add(round.checkpoints.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Moves the cursor, in a transaction that checks the lease is still ours.
    async fn commit_cursor(&self, next: &Cursor) -> Result<(), ExportError> {
        let store = self.store.clone();
        let (region, holder, ttl) = (self.region.clone(), self.holder.clone(), self.settings.lease_ttl_ms);
        let value = serde_json::to_vec(next).map_err(|_| ApiError::Internal)?;
        let held = tokio::task::spawn_blocking(move || {
            store.transact(|tx| -> Result<bool, ApiError> {
                let lease_key = keys::siem_lease(&region);
                let now = now_unix_ms();
                if !lease_view(tx, &lease_key, &holder, now, ttl)?.0 {
                    return Ok(false);
                }
                write_lease(tx, &lease_key, &holder, now + ttl)?;
                tx.set(&keys::siem_cursor(&region), &value)?;
                Ok(true)
            })
        })
        .await
        .map_err(|_| ApiError::Internal)??;
        if held.value { Ok(()) } else { Err(ExportError::LostLease) }
    }

    /// Publishes until the exporter has caught up with the head it sees, or `deadline`.
    pub async fn drain(&mut self, deadline: Instant) -> Result<(), ExportError> {
        while Instant::now() < deadline {
            if let Progress::Idle | Progress::Published { full: false, .. } = self.round().await? {
                return Ok(());
            }
        }
        Ok(())
    }
}
