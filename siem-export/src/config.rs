//! `arca-siem`'s configuration file (TOML, unknown keys refused).
//!
//! ```toml
//! region = "local"                    # whose log to export (the node's [node] region)
//!
//! [storage]                           # the same section as arcad's
//! engine = "sqlite"
//! path = "/var/lib/arca/arca.db"
//!
//! [kafka]
//! brokers = "kafka-1:9092,kafka-2:9092"
//! entries_topic = "arca.audit.entries"
//! checkpoints_topic = "arca.audit.checkpoints"
//! alerts_topic = "arca.audit.alerts"
//! [kafka.properties]                  # passed to librdkafka as they are: SASL, TLS, ...
//! "security.protocol" = "sasl_ssl"
//! "sasl.mechanism" = "SCRAM-SHA-512"
//! "sasl.username" = "arca"
//! "sasl.password" = "..."             # never logged
//!
//! [export]
//! batch_entries = 2000
//! poll_interval_ms = 100
//! lease_ttl_ms = 5000
//! delivery_timeout_ms = 10000
//! metrics_addr = "127.0.0.1:9464"
//!
//! [watch]                             # see `watch::Rules`
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use arca_node::config::StorageSection;
use serde::Deserialize;

use crate::watch::Rules;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The region whose log is exported.
    #[serde(default = "default_region")]
    pub region: String,
    pub storage: Option<StorageSection>,
    pub kafka: KafkaSection,
    #[serde(default)]
    pub export: ExportSection,
    #[serde(default)]
    pub watch: Rules,
}

fn default_region() -> String {
    "local".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    pub brokers: String,
    #[serde(default = "default_entries_topic")]
    pub entries_topic: String,
    #[serde(default = "default_checkpoints_topic")]
    pub checkpoints_topic: String,
    #[serde(default = "default_alerts_topic")]
    pub alerts_topic: String,
    /// Partitions for topics the exporter creates (every entry of one log shares a key, so
    /// one partition per log is used; more only spread several regions' logs).
    #[serde(default = "one")]
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// librdkafka settings, passed through (TLS, SASL, timeouts). Values are never logged.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_entries_topic() -> String {
    "arca.audit.entries".into()
}
fn default_checkpoints_topic() -> String {
    "arca.audit.checkpoints".into()
}
fn default_alerts_topic() -> String {
    "arca.audit.alerts".into()
}
fn one() -> i32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSection {
    /// Most entries per delivery round (one cursor write each).
    pub batch_entries: usize,
    /// Pause when caught up, or between lease attempts.
    pub poll_interval_ms: u64,
    pub lease_ttl_ms: u64,
    /// How long the producer keeps trying one message before the round fails and is retried.
    pub delivery_timeout_ms: u64,
    /// Longest pause between retries while the broker is unavailable.
    pub max_backoff_ms: u64,
    /// Where `/metrics` is served; none when absent.
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for ExportSection {
    fn default() -> Self {
        ExportSection {
            batch_entries: 2000,
            poll_interval_ms: 100,
            lease_ttl_ms: 5000,
            delivery_timeout_ms: 10_000,
            max_backoff_ms: 2000,
            metrics_addr: None,
        }
    }
}

impl ExportSection {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

/// Settings the exporter relies on for its guarantees: refused in `[kafka.properties]`.
const RESERVED: &[&str] = &["bootstrap.servers", "enable.idempotence", "acks", "transactional.id"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // toml's messages quote the offending line; a secret in a property value could be
        // echoed, so only the position is kept.
        let config: Config = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| format!(" at byte {}", s.start)).unwrap_or_default();
            let what = e.message().lines().next().unwrap_or("syntax error").to_owned();
            ConfigError::Parse(format!("{what}{at}"))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.kafka.brokers.trim().is_empty() {
            return invalid("kafka.brokers is empty");
        }
        for key in self.kafka.properties.keys() {
            if RESERVED.contains(&key.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "kafka.properties may not set {key}: the exporter sets it for its delivery guarantee"
                )));
            }
        }
        let topics = [&self.kafka.entries_topic, &self.kafka.checkpoints_topic, &self.kafka.alerts_topic];
        for topic in topics {
            if topic.is_empty()
                || topic.len() > 249
                || !topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(ConfigError::Invalid(format!("invalid Kafka topic name {topic:?}")));
            }
        }
        if self.kafka.partitions < 1 || self.kafka.replication_factor < 1 {
            return invalid("kafka.partitions and kafka.replication_factor must be at least 1");
        }
        let e = &self.export;
        if e.batch_entries == 0 || e.batch_entries > 100_000 {
            return invalid("export.batch_entries must be within 1..=100000");
        }
        if e.poll_interval_ms == 0 || e.lease_ttl_ms < 3 * e.poll_interval_ms {
            return invalid("export.lease_ttl_ms must be at least three poll intervals");
        }
        if e.delivery_timeout_ms < 100 {
            return invalid("export.delivery_timeout_ms must be at least 100");
        }
        if self.region.is_empty() || self.region.len() > 64 {
            return invalid("region must be 1..=64 bytes");
        }
        self.watch.validate().map_err(ConfigError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse("[kafka]\nbrokers = \"127.0.0.1:9092\"\n").unwrap();
        assert_eq!(c.region, "local");
        assert_eq!(c.kafka.entries_topic, "arca.audit.entries");
        assert_eq!(c.export.batch_entries, 2000);
        assert!(c.storage.is_none());
    }

    #[test]
    fn the_shipped_dev_config_parses() {
        let text = include_str!("../arca-siem.dev.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.watch.baseline_secs, 3600);
    }

    #[test]
    fn bad_configs_are_refused_without_echoing_values() {
        let bad = [
            "[kafka]\nbrokers = \"\"\n",
            "[kafka]\nbrokers = \"b\"\nentries_topic = \"a b\"\n",
            "[kafka]\nbrokers = \"b\"\n[kafka.properties]\n\"enable.idempotence\" = \"false\"\n",
            "[kafka]\nbrokers = \"b\"\n[export]\nbatch_entries = 0\n",
            "[kafka]\nbrokers = \"b\"\nsurprise = 1\n",
            "[kafka]\nbrokers = \"b\"\n[watch]\ndistinct_secrets_threshold = 0\n",
        ];
        for text in bad {
            assert!(Config::parse(text).is_err(), "accepted: {text}");
        }
        let err = Config::parse("[kafka]\nbrokers = \"b\"\n[kafka.properties]\n\"sasl.password\" = 5\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("sasl.password\" = 5"), "{err}");
    }
}
