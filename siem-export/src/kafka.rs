//! Kafka clients as the exporter, the verifier and the watcher use them.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSection;

/// The header carrying an entry message's leaf index (decimal).
pub const LEAF_INDEX_HEADER: &str = "arca-leaf-index";
/// Largest message the consumers accept.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

fn base(kafka: &KafkaSection) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// Notes when the producer lost its brokers (global transport errors), for the exporter's
/// re-send after a broker failure.
#[derive(Debug, Clone, Default)]
pub struct BrokerWatch {
    /// Milliseconds since the epoch of the last broker failure seen (0: none).
    pub failed_at_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl rdkafka::ClientContext for BrokerWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        if matches!(
            error.rdkafka_error_code(),
            Some(Code::AllBrokersDown | Code::BrokerTransportFailure | Code::BrokerNotAvailable)
        ) {
            self.failed_at_ms.store(arca_node::node::now_unix_ms(), std::sync::atomic::Ordering::SeqCst);
        }
        tracing::error!("librdkafka: {error}: {reason}");
    }
}

/// The exporter's producer: idempotent (no duplicates or reordering from its own retries),
/// acknowledged by all in-sync replicas; `watch` learns of broker failures.
pub fn producer(
    kafka: &KafkaSection,
    delivery_timeout: Duration,
    watch: BrokerWatch,
) -> Result<FutureProducer<BrokerWatch>, KafkaError> {
    let mut config = base(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", delivery_timeout.as_millis().to_string())
        .set("linger.ms", "5")
        .set("reconnect.backoff.max.ms", "1000");
    config.create_with_context(watch)
}

/// A consumer that reads by assignment (no group membership, no committed offsets).
pub fn reader(kafka: &KafkaSection) -> Result<BaseConsumer, KafkaError> {
    let mut config = base(kafka);
    let mut suffix = [0u8; 8];
    rand::fill(&mut suffix);
    config
        .set("group.id", format!("arca-siem-reader-{}", hex::encode(suffix)))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", MAX_MESSAGE_BYTES.to_string());
    config.create()
}

/// Creates the topics if they do not exist. Idempotent.
pub async fn ensure_topics(
    kafka: &KafkaSection,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(kafka).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, kafka.partitions, TopicReplication::Fixed(kafka.replication_factor)))
        .collect();
    let results = admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(timeout))).await?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// One consumed message, as the verifier and the watcher see it.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The leaf-index header, when present and a decimal number.
    pub leaf_index_header: Option<String>,
    pub payload: Vec<u8>,
}

fn record(m: &impl Message) -> Record {
    let leaf_index_header = m.headers().and_then(|h| {
        h.iter()
            .find(|hd| hd.key == LEAF_INDEX_HEADER)
            .and_then(|hd| hd.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    });
    Record {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        leaf_index_header,
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

/// How long a read waits for more after it reached the end the broker reported.
const SETTLE: Duration = Duration::from_millis(1500);

/// Reads every message of `topic` from the beginning up to its end: at least to the high
/// watermarks it had when the read started, then on until no message arrived for a short
/// settle time (tansu 0.6 reports the last batch's base offset as the high watermark, so
/// the watermark alone would stop a read one batch early). Fails when the broker does not
/// answer within `timeout`.
pub fn read_topic(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Record>, KafkaError> {
    let deadline = Instant::now() + timeout;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition));
    }
    let mut ends = std::collections::BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        if high > low {
            ends.insert(*p, high);
        }
        assignment.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut out = Vec::new();
    let mut last_message = Instant::now();
    while !ends.is_empty() || last_message.elapsed() < SETTLE {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
        }
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = polled?;
        let r = record(&m);
        last_message = Instant::now();
        if let Some(end) = ends.get(&r.partition)
            && r.offset + 1 >= *end
        {
            ends.remove(&r.partition);
        }
        out.push(r);
    }
    consumer.unassign()?;
    Ok(out)
}

/// Follows `topics` from the beginning, calling `each` with the topic's position in
/// `topics` for every message, until `each` returns false. Used by `watch`; `until_end` reads
/// each topic in turn up to the end it had at start.
pub fn follow_topics(
    consumer: &BaseConsumer,
    topics: &[&str],
    timeout: Duration,
    until_end: bool,
    mut each: impl FnMut(usize, Record) -> bool,
) -> Result<(), KafkaError> {
    if until_end {
        for (i, topic) in topics.iter().enumerate() {
            for r in read_topic(consumer, topic, timeout)? {
                if !each(i, r) {
                    return Ok(());
                }
            }
        }
        return Ok(());
    }
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics().iter().filter(|t| t.name() == *topic) {
            for p in t.partitions() {
                assignment.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&assignment)?;
    loop {
        let Some(polled) = consumer.poll(Duration::from_millis(500)) else { continue };
        match polled {
            Ok(m) => {
                let Some(i) = topics.iter().position(|t| *t == m.topic()) else { continue };
                if !each(i, record(&m)) {
                    return Ok(());
                }
            }
            Err(err) => tracing::warn!(error = %err, "consume failed; retrying"),
        }
    }
}
