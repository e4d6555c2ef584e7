//! `arcad server`'s configuration file (TOML). Unknown keys are errors.
//!
//! ```toml
//! [node]
//! id = "node-a"          # default: the host name
//! region = "eu-west"     # default: "local"
//! cluster = "arca"       # default: "arca"
//!
//! [storage]
//! engine = "sqlite"      # or "fdb" (build with --features fdb)
//! path = "/var/lib/arca/arca.db"   # sqlite
//! # cluster_file = "/etc/foundationdb/fdb.cluster"   # fdb
//!
//! [listener]
//! grpc_addr = "0.0.0.0:8400"
//! tls_cert_file = "/etc/arca/tls.crt"
//! tls_key_file = "/etc/arca/tls.key"
//! # client_ca_file = "/etc/arca/clients-ca.crt"   # require client certificates (mTLS)
//! # dangerous_plaintext = false   # plaintext only on a loopback address
//! http_addr = "127.0.0.1:8200"       # /metrics and the audit log (TLS when configured)
//! # proxy_header = "x-forwarded-for"
//! # trusted_proxies = ["10.0.0.2"]
//! # max_connections = 4096          # per listener (gRPC, HTTP, replication); more wait
//! # tls_handshake_timeout_ms = 10000
//! # header_timeout_ms = 30000       # HTTP/1 request head, and a kept-alive connection's idle wait
//! # body_timeout_ms = 30000         # HTTP request body
//! # idle_timeout_ms = 120000        # a connection that sends nothing for this long is closed
//! # max_streams_per_connection = 128   # HTTP/2 requests at once on one connection
//! # max_body_bytes_in_flight = 67108864  # request bodies being received, per listener; past it 503
//! # max_connection_age_ms = 3600000       # a connection this old is asked to close (GOAWAY)…
//! # max_connection_age_grace_ms = 300000  # …and cut this long after if it has not
//!
//! [sequencer]           # the audit log's sequencer (all optional)
//! interval_ms = 100    # pause when idle; an eighth of it after a step that integrated entries
//! lease_ttl_ms = 2000
//! max_entries_per_checkpoint = 16384
//!
//! [replication]         # cross-region replication (absent: a single region)
//! listen_addr = "0.0.0.0:8500"       # where standbys pull from (mTLS)
//! tls_cert_file = "/etc/arca/repl.crt"   # this region's certificate: server and client;
//!                                        # its subjectAltName names the region ("eu-west")
//! tls_key_file = "/etc/arca/repl.key"
//! ca_file = "/etc/arca/regions-ca.crt"   # signs every region's certificate
//! # dangerous_plaintext = false   # loopback only, development
//! initial_primary = "eu-west"        # the primary when the cluster first starts
//! [[replication.peers]]
//! region = "us-east"
//! endpoint = "https://us-east.arca.internal:8500"
//!
//! [audit_archive]       # audit log retention (absent: the store keeps the whole log)
//! dir = "/var/lib/arca/audit-archive"   # a static tlog-tiles log; serve it as files
//! retain_entries = 10000000          # sequenced entries kept in the store
//! # retain_days = 30                 # and every entry younger than this
//! # interval_ms = 1000
//!
//! [log]
//! level = "info"         # a tracing filter
//! format = "text"        # or "json"
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeSection,
    pub storage: StorageSection,
    pub listener: ListenerSection,
    #[serde(default)]
    pub sequencer: SequencerSection,
    #[serde(default)]
    pub log: LogSection,
    pub replication: Option<ReplicationSection>,
    pub audit_archive: Option<AuditArchiveSection>,
    pub seal: Option<SealSection>,
    pub lifecycle: Option<LifecycleSection>,
}

/// Secret lifecycle: where external rotators live (`exec` rotators name a file here).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSection {
    pub rotators_dir: Option<PathBuf>,
    /// URL prefixes rotator hooks may use (e.g. `https://rotator.internal/`).
    #[serde(default)]
    pub rotator_hook_prefixes: Vec<String>,
}

/// How the unseal key is protected: `type = "shamir"` (the default: operators' key shares)
/// or `type = "pkcs11"` (an HSM unseals the node at start; the shares become recovery keys).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealSection {
    #[serde(rename = "type")]
    pub kind: String,
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: Option<PathBuf>,
    pub token_label: Option<String>,
    /// The AES key's label inside the token (created on init or migration if missing).
    pub key_label: Option<String>,
    /// A file holding the user PIN (mode 0600).
    pub pin_file: Option<PathBuf>,
    /// Or the name of an environment variable holding it.
    pub pin_env: Option<String>,
}

impl SealSection {
    /// The PKCS#11 seal, for `type = "pkcs11"`.
    pub fn pkcs11(&self) -> Result<Option<crate::hsm::Pkcs11Config>, ConfigError> {
        use crate::hsm::{PinSource, Pkcs11Config};
        let missing =
            |what: &str| ConfigError::Invalid(format!("seal.{what} is required for type = \"pkcs11\""));
        match self.kind.as_str() {
            "shamir" => Ok(None),
            "pkcs11" => Ok(Some(Pkcs11Config {
                module: self.module.clone().ok_or_else(|| missing("module"))?,
                token_label: self.token_label.clone().ok_or_else(|| missing("token_label"))?,
                key_label: self.key_label.clone().ok_or_else(|| missing("key_label"))?,
                pin: match (&self.pin_file, &self.pin_env) {
                    (Some(file), None) => PinSource::File(file.clone()),
                    (None, Some(var)) => PinSource::Env(var.clone()),
                    _ => {
                        return Err(ConfigError::Invalid(
                            "give exactly one of seal.pin_file and seal.pin_env (never the PIN itself)"
                                .into(),
                        ));
                    }
                },
            })),
            other => Err(ConfigError::Invalid(format!(
                "seal.type must be \"shamir\" or \"pkcs11\", not {other:?}"
            ))),
        }
    }
}

/// Audit log retention: archive to `dir` (tlog-tiles), keep `retain_entries` in the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditArchiveSection {
    pub dir: PathBuf,
    /// Sequenced entries kept in the store.
    pub retain_entries: u64,
    /// And entries younger than this many days (optional).
    pub retain_days: Option<u64>,
    pub interval_ms: Option<u64>,
}

/// Cross-region replication settings (see the module documentation).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    pub listen_addr: SocketAddr,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub dangerous_plaintext: bool,
    pub initial_primary: String,
    #[serde(default)]
    pub peers: Vec<PeerSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub region: String,
    /// `https://host:port` (or `http://` with `dangerous_plaintext`, loopback only).
    pub endpoint: String,
}

impl ReplicationSection {
    pub fn validate(&self, own_region: &str) -> Result<(), String> {
        let tls = [&self.tls_cert_file, &self.tls_key_file, &self.ca_file];
        match (tls.iter().all(|f| f.is_some()), tls.iter().all(|f| f.is_none())) {
            (true, _) => {}
            (false, true) if self.dangerous_plaintext => {
                if !self.listen_addr.ip().is_loopback() {
                    return Err(
                        "replication: dangerous_plaintext is only allowed on a loopback address".into()
                    );
                }
            }
            _ => {
                return Err("replication: tls_cert_file, tls_key_file and ca_file are required (mTLS)".into());
            }
        }
        let mut names: Vec<&str> = self.peers.iter().map(|p| p.region.as_str()).collect();
        names.push(own_region);
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        if names.len() != count {
            return Err(
                "replication: region names must be unique (and peers must not name this region)".into()
            );
        }
        if !names.contains(&self.initial_primary.as_str()) {
            return Err("replication: initial_primary must be this region or a peer".into());
        }
        for p in &self.peers {
            let plain = p.endpoint.starts_with("http://");
            if !(p.endpoint.starts_with("https://") || plain && self.dangerous_plaintext) {
                return Err(format!("replication: peer {} endpoint must be https:// (mTLS)", p.region));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SequencerSection {
    pub interval_ms: Option<u64>,
    pub lease_ttl_ms: Option<u64>,
    pub max_entries_per_checkpoint: Option<usize>,
}

impl SequencerSection {
    pub fn to_config(&self) -> crate::sequencer::SequencerConfig {
        let default = crate::sequencer::SequencerConfig::default();
        crate::sequencer::SequencerConfig {
            interval: self.interval_ms.map_or(default.interval, std::time::Duration::from_millis),
            lease_ttl: self.lease_ttl_ms.map_or(default.lease_ttl, std::time::Duration::from_millis),
            max_batch: self.max_entries_per_checkpoint.unwrap_or(default.max_batch),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub id: Option<String>,
    pub region: Option<String>,
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum Engine {
    Sqlite,
    Fdb,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub engine: Engine,
    pub path: Option<PathBuf>,
    pub cluster_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub grpc_addr: SocketAddr,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub dangerous_plaintext: bool,
    pub http_addr: Option<SocketAddr>,
    pub proxy_header: Option<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<IpAddr>,
    /// Connections open at once on each listener (default 4096).
    pub max_connections: Option<usize>,
    /// A TLS handshake (default 10 s).
    pub tls_handshake_timeout_ms: Option<u64>,
    /// HTTP/1: a request's line and headers, and a kept-alive connection's wait for its next
    /// request (default 30 s).
    pub header_timeout_ms: Option<u64>,
    /// HTTP: a request's body (default 30 s).
    pub body_timeout_ms: Option<u64>,
    /// A connection that sends nothing for this long is closed (default 120 s).
    pub idle_timeout_ms: Option<u64>,
    /// HTTP/2: requests at once on one connection (default 128).
    pub max_streams_per_connection: Option<u32>,
    /// Bytes of request bodies being received at once, per listener (default 64 MiB).
    pub max_body_bytes_in_flight: Option<usize>,
    /// A connection this old is asked to close once its requests are answered (default 1 h).
    pub max_connection_age_ms: Option<u64>,
    /// How long after that a connection still open is cut (default 5 min).
    pub max_connection_age_grace_ms: Option<u64>,
}

impl ListenerSection {
    /// The listeners' limits, defaults filled in.
    pub fn limits(&self) -> Result<crate::listen::Limits, ConfigError> {
        let default = crate::listen::Limits::default();
        if self.max_connections.is_some_and(|n| n == 0 || n > 1_000_000) {
            return Err(ConfigError::Invalid("listener.max_connections: 1..=1000000".into()));
        }
        if self.max_streams_per_connection.is_some_and(|n| n == 0 || n > 10_000) {
            return Err(ConfigError::Invalid("listener.max_streams_per_connection: 1..=10000".into()));
        }
        // At least four requests of the largest size; at most 64 GiB.
        if self.max_body_bytes_in_flight.is_some_and(|n| !(1 << 20..=64 << 30).contains(&n)) {
            return Err(ConfigError::Invalid(
                "listener.max_body_bytes_in_flight: 1048576..=68719476736 (bytes)".into(),
            ));
        }
        let ms = |key: &str, value: Option<u64>, default: Duration| match value {
            None => Ok(default),
            Some(ms @ 100..=86_400_000) => Ok(Duration::from_millis(ms)),
            Some(_) => Err(ConfigError::Invalid(format!("listener.{key}: 100..=86400000 (milliseconds)"))),
        };
        Ok(crate::listen::Limits {
            max_connections: self.max_connections.unwrap_or(default.max_connections),
            tls_handshake_timeout: ms(
                "tls_handshake_timeout_ms",
                self.tls_handshake_timeout_ms,
                default.tls_handshake_timeout,
            )?,
            header_timeout: ms("header_timeout_ms", self.header_timeout_ms, default.header_timeout)?,
            body_timeout: ms("body_timeout_ms", self.body_timeout_ms, default.body_timeout)?,
            idle_timeout: ms("idle_timeout_ms", self.idle_timeout_ms, default.idle_timeout)?,
            max_streams_per_connection: self
                .max_streams_per_connection
                .unwrap_or(default.max_streams_per_connection),
            max_body_bytes_in_flight: self
                .max_body_bytes_in_flight
                .unwrap_or(default.max_body_bytes_in_flight),
            max_connection_age: ms(
                "max_connection_age_ms",
                self.max_connection_age_ms,
                default.max_connection_age,
            )?,
            max_connection_age_grace: ms(
                "max_connection_age_grace_ms",
                self.max_connection_age_grace_ms,
                default.max_connection_age_grace,
            )?,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { level: default_level(), format: LogFormat::Text }
    }
}

fn default_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => {
                ConfigError::Parse { path: path.display().to_string(), message }
            }
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // The parser's own rendering quotes the offending line, which may hold a secret (a
        // misplaced PIN or token): keep its message and the line number only.
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            ConfigError::Parse { path: "config".into(), message: format!("{}{at}", e.message()) }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(seal) = &self.seal {
            seal.pkcs11()?;
        }
        match self.storage.engine {
            Engine::Sqlite if self.storage.path.is_none() => {
                return Err(ConfigError::Invalid("storage.path is required for the sqlite engine".into()));
            }
            Engine::Fdb if !cfg!(feature = "fdb") => {
                return Err(ConfigError::Invalid(
                    "storage.engine = \"fdb\" needs arcad built with --features fdb".into(),
                ));
            }
            _ => {}
        }
        let l = &self.listener;
        match (&l.tls_cert_file, &l.tls_key_file) {
            (Some(_), Some(_)) => {}
            (None, None) if l.dangerous_plaintext => {
                if !l.grpc_addr.ip().is_loopback() {
                    return Err(ConfigError::Invalid(
                        "dangerous_plaintext is only allowed on a loopback address".into(),
                    ));
                }
            }
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "listener.tls_cert_file and tls_key_file are required (or dangerous_plaintext on loopback)".into(),
                ));
            }
            _ => return Err(ConfigError::Invalid("set both listener.tls_cert_file and tls_key_file".into())),
        }
        if l.client_ca_file.is_some() && l.tls_cert_file.is_none() {
            return Err(ConfigError::Invalid("client_ca_file needs TLS".into()));
        }
        let seq = &self.sequencer;
        if seq.max_entries_per_checkpoint.is_some_and(|n| n == 0 || n > 1_000_000)
            || seq.interval_ms.is_some_and(|i| i == 0 || i > 1000)
            || seq.lease_ttl_ms.is_some_and(|t| !(100..=60_000).contains(&t))
        {
            return Err(ConfigError::Invalid(
                "sequencer: max_entries_per_checkpoint 1..=1000000, interval_ms 1..=1000 (a checkpoint at least every second), lease_ttl_ms 100..=60000".into(),
            ));
        }
        if let Some(r) = &self.replication {
            r.validate(self.node.region.as_deref().unwrap_or("local")).map_err(ConfigError::Invalid)?;
        }
        if l.proxy_header.is_some() == l.trusted_proxies.is_empty() {
            return Err(ConfigError::Invalid("set proxy_header and trusted_proxies together".into()));
        }
        l.limits()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [node]
        id = "a"
        [storage]
        engine = "sqlite"
        path = "/tmp/x.db"
        [listener]
        grpc_addr = "127.0.0.1:8400"
        dangerous_plaintext = true
    "#;

    #[test]
    fn accepts_a_valid_file() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.node.id.as_deref(), Some("a"));
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn the_listeners_limits_default_parse_and_refuse_what_is_out_of_range() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.listener.limits().unwrap(), crate::listen::Limits::default());
        let set = GOOD.replace(
            "dangerous_plaintext = true",
            "dangerous_plaintext = true\nmax_connections = 64\ntls_handshake_timeout_ms = 2000\n\
             header_timeout_ms = 3000\nbody_timeout_ms = 4000\nidle_timeout_ms = 60000\n\
             max_streams_per_connection = 16\nmax_body_bytes_in_flight = 2097152\n\
             max_connection_age_ms = 600000\nmax_connection_age_grace_ms = 7000",
        );
        let limits = Config::parse(&set).unwrap().listener.limits().unwrap();
        assert_eq!(
            limits,
            crate::listen::Limits {
                max_connections: 64,
                tls_handshake_timeout: Duration::from_secs(2),
                header_timeout: Duration::from_secs(3),
                body_timeout: Duration::from_secs(4),
                idle_timeout: Duration::from_secs(60),
                max_streams_per_connection: 16,
                max_body_bytes_in_flight: 2 << 20,
                max_connection_age: Duration::from_secs(600),
                max_connection_age_grace: Duration::from_secs(7),
            }
        );
        assert_eq!(limits.keepalive_interval(), Duration::from_secs(20));
        for (bad, says) in [
            ("max_connections = 0", "max_connections"),
            ("max_connections = 1000001", "max_connections"),
            ("idle_timeout_ms = 99", "idle_timeout_ms"),
            ("header_timeout_ms = 86400001", "header_timeout_ms"),
            ("body_timeout_ms = 0", "body_timeout_ms"),
            ("tls_handshake_timeout_ms = 1", "tls_handshake_timeout_ms"),
            ("max_streams_per_connection = 0", "max_streams_per_connection"),
            ("max_streams_per_connection = 10001", "max_streams_per_connection"),
            ("max_body_bytes_in_flight = 1048575", "max_body_bytes_in_flight"),
            ("max_body_bytes_in_flight = 68719476737", "max_body_bytes_in_flight"),
            ("max_connection_age_ms = 86400001", "max_connection_age_ms"),
            ("max_connection_age_grace_ms = 0", "max_connection_age_grace_ms"),
        ] {
            let file =
                GOOD.replace("dangerous_plaintext = true", &format!("dangerous_plaintext = true\n{bad}"));
            match Config::parse(&file) {
                Err(ConfigError::Invalid(message)) => assert!(message.contains(says), "{bad}: {message}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_unknown_keys_and_unsafe_settings() {
        let unknown = GOOD.replace("id = \"a\"", "id = \"a\"\ncolour = \"blue\"");
        assert!(matches!(Config::parse(&unknown), Err(ConfigError::Parse { .. })));
        let public_plaintext = GOOD.replace("127.0.0.1:8400", "0.0.0.0:8400");
        assert!(matches!(Config::parse(&public_plaintext), Err(ConfigError::Invalid(_))));
        let no_tls = GOOD.replace("dangerous_plaintext = true", "");
        assert!(matches!(Config::parse(&no_tls), Err(ConfigError::Invalid(_))));
        let no_path = GOOD.replace("path = \"/tmp/x.db\"", "");
        assert!(matches!(Config::parse(&no_path), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn seal_sections_are_checked() {
        let seal = |body: &str| Config::parse(&format!("{GOOD}\n[seal]\n{body}"));
        let pkcs11 = "type = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\n";
        let ok = seal(&format!("{pkcs11}pin_file = \"/p\"")).unwrap();
        let hsm = ok.seal.unwrap().pkcs11().unwrap().unwrap();
        assert_eq!(hsm.pin, crate::hsm::PinSource::File("/p".into()));
        assert!(seal("type = \"shamir\"").unwrap().seal.unwrap().pkcs11().unwrap().is_none());
        for bad in [
            pkcs11.to_owned(),                                     // no PIN source
            format!("{pkcs11}pin_file = \"/p\"\npin_env = \"X\""), // two PIN sources
            format!("{pkcs11}pin = \"1234\""),                     // an inline PIN
            "type = \"pkcs11\"\npin_env = \"X\"".to_owned(),       // no module
            "type = \"kms\"".to_owned(),
        ] {
            let err = seal(&bad).unwrap_err().to_string();
            assert!(!err.contains("1234"), "{err}");
        }
    }
}
