//! One audit entry as an OCSF **API Activity** event (class 6003, category 6).
//!
//! The mapping is a pure function of the entry's bytes, the log's origin and the leaf index:
//! `arca-siem verify` recomputes it from the `arca.entry` field and compares the whole
//! message, so an altered field anywhere in the JSON is caught, not only an altered entry.
//! The `arca` extension object carries what the proof needs: origin, leaf index, leaf hash
//! (hex, RFC 6962 `SHA-256(0x00 ‖ entry)`) and the entry itself (base64, the exact bytes).

use std::net::{IpAddr, SocketAddr};

use arca_audit::merkle;
use arca_audit::{Event, Operation, Outcome};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde_json::Value;

/// The OCSF schema version the messages follow.
pub const OCSF_VERSION: &str = "1.3.0";
pub const CLASS_UID: u32 = 6003;
pub const CATEGORY_UID: u32 = 6;

/// OCSF API Activity `activity_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Create = 1,
    Read = 2,
    Update = 3,
    Delete = 4,
    Other = 99,
}

impl Activity {
    pub fn name(self) -> &'static str {
        match self {
            Activity::Create => "Create",
            Activity::Read => "Read",
            Activity::Update => "Update",
            Activity::Delete => "Delete",
            Activity::Other => "Other",
        }
    }

    pub fn type_name(self) -> &'static str {
        match self {
            Activity::Create => "API Activity: Create",
            Activity::Read => "API Activity: Read",
            Activity::Update => "API Activity: Update",
            Activity::Delete => "API Activity: Delete",
            Activity::Other => "API Activity: Other",
        }
    }

    /// What an operation does to the resource it names.
    pub fn of(op: Operation) -> Activity {
        use Operation::*;
        match op {
            KvWrite | TokenCreate | AppRoleSecretId => Activity::Create,
            KvRead | KvList | KvReadMetadata | TokenLookup | AppRoleRead | AppRoleList | PolicyRead
            | PolicyList | CertRoleRead | MountRead | MountList | Status | Health | RegionPull
            | RegionSnapshot | DbConfigRead | DbConfigList | DbRoleRead | DbRoleList | LeaseLookup
            | LeaseList => Activity::Read,
            KvPatch | KvUndelete | KvWriteMetadata | TokenRenew | AppRoleWrite | PolicyWrite
            | CertRoleWrite | MountWrite | Rotate | DbConfigWrite | DbRoleWrite | DbRotateRoot => {
                Activity::Update
            }
            KvDelete | KvDestroy | KvDeleteMetadata | TokenRevoke | AppRoleDelete | PolicyDelete
            | CertRoleDelete | MountDelete | DbConfigDelete | DbRoleDelete => Activity::Delete,
            _ => Activity::Other,
        }
    }
}

/// The kind of resource a path names, for `resources[].type`.
fn resource_type(op: Operation) -> &'static str {
    use Operation::*;
    match op {
        KvRead | KvWrite | KvPatch | KvList | KvDelete | KvUndelete | KvDestroy | KvReadMetadata
        | KvWriteMetadata | KvDeleteMetadata => "secret",
        TokenCreate | TokenLookup | TokenRenew | TokenRevoke => "token",
        AppRoleWrite | AppRoleRead | AppRoleSecretId | AppRoleLogin | AppRoleDelete | AppRoleList => {
            "approle"
        }
        PolicyWrite | PolicyRead | PolicyList | PolicyDelete => "policy",
        CertRoleWrite | CertRoleRead | CertRoleDelete | CertLogin => "cert_role",
        MountWrite | MountRead | MountDelete | MountList => "mount",
        DbConfigWrite | DbConfigRead | DbConfigList | DbConfigDelete | DbRotateRoot => "database_connection",
        DbRoleWrite | DbRoleRead | DbRoleList | DbRoleDelete => "database_role",
        // What the replication listener hands a standby region: the replicated keyspace.
        RegionPull | RegionSnapshot => "replication_feed",
        _ => "system",
    }
}

/// `src_endpoint`: `ip:port`, a bare ip, or a label (`unknown`) as its name.
#[derive(Debug, Serialize)]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    intermediate_ips: Option<[&'a str; 1]>,
}

fn endpoint<'a>(address: &'a str, proxy: Option<&'a str>) -> Endpoint<'a> {
    let intermediate_ips = proxy.map(|p| [source_ip(p)]);
    if let Ok(sa) = address.parse::<SocketAddr>() {
        Endpoint { ip: Some(sa.ip().to_string()), port: Some(sa.port()), name: None, intermediate_ips }
    } else if let Ok(ip) = address.parse::<IpAddr>() {
        Endpoint { ip: Some(ip.to_string()), port: None, name: None, intermediate_ips }
    } else {
        Endpoint { ip: None, port: None, name: Some(address), intermediate_ips }
    }
}

/// The client's IP, as rules compare it (the port changes with every connection).
pub fn source_ip(address: &str) -> &str {
    match address.rfind(':') {
        Some(i) if address[..i].parse::<IpAddr>().is_ok() || address[..i].starts_with('[') => {
            address[..i].trim_start_matches('[').trim_end_matches(']')
        }
        _ => address,
    }
}

#[derive(Debug, Serialize)]
struct Named<'a> {
    name: &'a str,
}

#[derive(Debug, Serialize)]
struct Uid<'a> {
    uid: &'a str,
}

#[derive(Debug, Serialize)]
struct Metadata<'a> {
    version: &'static str,
    uid: &'a str,
    log_name: &'a str,
    product: Product,
}

#[derive(Debug, Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

#[derive(Debug, Serialize)]
struct User<'a> {
    name: &'a str,
    uid: &'a str,
}

#[derive(Debug, Serialize)]
struct ActorObj<'a> {
    user: User<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<Uid<'a>>,
}

#[derive(Debug, Serialize)]
struct Api<'a> {
    operation: &'static str,
    service: Named<'static>,
    request: Uid<'a>,
}

#[derive(Debug, Serialize)]
struct Destination<'a> {
    hostname: &'a str,
    svc_name: &'static str,
}

#[derive(Debug, Serialize)]
struct Cloud<'a> {
    provider: &'static str,
    region: &'a str,
}

#[derive(Debug, Serialize)]
struct Resource<'a> {
    name: &'a str,
    uid: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

#[derive(Debug, Serialize)]
struct Extension<'a> {
    origin: &'a str,
    leaf_index: u64,
    leaf_hash: String,
    entry: String,
    cluster: &'a str,
    region: &'a str,
    node: &'a str,
}

/// One OCSF API Activity event, borrowing from the audit event it maps.
#[derive(Debug, Serialize)]
pub struct Ocsf<'a> {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    activity_name: &'static str,
    type_uid: u32,
    type_name: &'static str,
    time: u64,
    severity_id: u32,
    severity: &'static str,
    status_id: u32,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<&'a str>,
    metadata: Metadata<'a>,
    actor: ActorObj<'a>,
    api: Api<'a>,
    src_endpoint: Endpoint<'a>,
    dst_endpoint: Destination<'a>,
    cloud: Cloud<'a>,
    resources: [Resource<'a>; 1],
    arca: Extension<'a>,
}

impl Ocsf<'_> {
    /// The message text the exporter publishes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an OCSF event always serializes")
    }

    /// The same, as a JSON value (what `verify` compares a received message with).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("an OCSF event always serializes")
    }
}

/// The OCSF event for leaf `index` of the log `origin`, whose entry is `entry` (decoded as
/// `event`).
pub fn ocsf<'a>(origin: &'a str, index: u64, entry: &[u8], event: &'a Event) -> Ocsf<'a> {
    let activity = Activity::of(event.operation);
    let (status_id, status, severity_id, severity) = match &event.outcome {
        Outcome::Ok => (1, "Success", 1, "Informational"),
        Outcome::Denied | Outcome::DeniedBy { .. } => (2, "Failure", 3, "Medium"),
        Outcome::Error { .. } => (2, "Failure", 2, "Low"),
    };
    Ocsf {
        class_uid: CLASS_UID,
        class_name: "API Activity",
        category_uid: CATEGORY_UID,
        category_name: "Application Activity",
        activity_id: activity as u32,
        activity_name: activity.name(),
        type_uid: CLASS_UID * 100 + activity as u32,
        type_name: activity.type_name(),
        time: event.time_unix_ms,
        severity_id,
        severity,
        status_id,
        status,
        status_detail: match &event.outcome {
            Outcome::Denied => Some("permission denied"),
            // The failed condition: `<policy>: <condition>`.
            Outcome::DeniedBy { condition } => Some(condition.as_str()),
            _ => None,
        },
        status_code: match &event.outcome {
            Outcome::Error { code } => Some(code),
            _ => None,
        },
        metadata: Metadata {
            version: OCSF_VERSION,
            uid: &event.request_id,
            log_name: origin,
            product: Product { name: "arca", vendor_name: "arca", version: env!("CARGO_PKG_VERSION") },
        },
        actor: ActorObj {
            user: User { name: &event.actor.entity, uid: &event.actor.entity },
            session: event.actor.token_accessor.as_deref().map(|uid| Uid { uid }),
        },
        api: Api {
            operation: event.operation.name(),
            service: Named { name: "arca" },
            request: Uid { uid: &event.request_id },
        },
        src_endpoint: endpoint(&event.source.address, event.source.proxy.as_deref()),
        dst_endpoint: Destination { hostname: &event.node, svc_name: "arca" },
        cloud: Cloud { provider: "arca", region: &event.region },
        resources: [Resource {
            name: &event.path,
            uid: &event.path,
            kind: resource_type(event.operation),
            version: event.secret_version.map(|v| v.to_string()),
        }],
        arca: Extension {
            origin,
            leaf_index: index,
            leaf_hash: hex::encode(merkle::leaf_hash(entry)),
            entry: B64.encode(entry),
            cluster: &event.cluster,
            region: &event.region,
            node: &event.node,
        },
    }
}

/// [`ocsf`] as a JSON value.
pub fn to_ocsf(origin: &str, index: u64, entry: &[u8], event: &Event) -> Value {
    ocsf(origin, index, entry, event).to_value()
}

/// What a consumer reads back from one message: the fields the proof needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub origin: String,
    pub index: u64,
    pub leaf_hash: String,
    pub entry: Vec<u8>,
}

/// Why a message is not a well-formed arca OCSF event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not JSON")]
    NotJson,
    #[error("missing or malformed field {0}")]
    Field(&'static str),
}

/// Reads the `arca` extension object of a message.
pub fn envelope(value: &Value) -> Result<Envelope, EnvelopeError> {
    let arca = value.get("arca").ok_or(EnvelopeError::Field("arca"))?;
    let text = |name: &'static str| arca.get(name).and_then(Value::as_str).ok_or(EnvelopeError::Field(name));
    let entry = B64.decode(text("entry")?).map_err(|_| EnvelopeError::Field("entry"))?;
    Ok(Envelope {
        origin: text("origin")?.to_owned(),
        index: arca.get("leaf_index").and_then(Value::as_u64).ok_or(EnvelopeError::Field("leaf_index"))?,
        leaf_hash: text("leaf_hash")?.to_owned(),
        entry,
    })
}

/// Parses a message's bytes as JSON (size-limited by the caller's consumer settings).
pub fn parse(payload: &[u8]) -> Result<Value, EnvelopeError> {
    serde_json::from_slice(payload).map_err(|_| EnvelopeError::NotJson)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_audit::{Actor, Source};
    use serde_json::json;

    fn event(op: Operation, outcome: Outcome) -> Event {
        Event {
            time_unix_ms: 1_700_000_000_123,
            request_id: "0123abcd".into(),
            cluster: "c".into(),
            region: "r".into(),
            node: "n1".into(),
            actor: Actor { entity: "approle:web".into(), token_accessor: Some("acc".into()) },
            source: Source { address: "10.1.2.3:5555".into(), proxy: Some("10.0.0.1:443".into()) },
            operation: op,
            path: "secret/data/app/db".into(),
            secret_version: Some(3),
            outcome,
        }
    }

    #[test]
    fn maps_the_required_fields() {
        let e = event(Operation::KvRead, Outcome::Ok);
        let entry = e.encode();
        let v = to_ocsf("arca/c/r", 42, &entry, &e);
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(v["activity_id"], 2);
        assert_eq!(v["type_uid"], 600302);
        assert_eq!(v["actor"]["user"]["name"], "approle:web");
        assert_eq!(v["actor"]["session"]["uid"], "acc");
        assert_eq!(v["api"]["operation"], "kv.read");
        assert_eq!(v["src_endpoint"]["ip"], "10.1.2.3");
        assert_eq!(v["src_endpoint"]["port"], 5555);
        assert_eq!(v["src_endpoint"]["intermediate_ips"][0], "10.0.0.1");
        assert_eq!(v["resources"][0]["name"], "secret/data/app/db");
        assert_eq!(v["resources"][0]["version"], "3");
        assert_eq!(v["status_id"], 1);
        assert_eq!(v["time"], 1_700_000_000_123u64);
        let env = envelope(&v).unwrap();
        assert_eq!(
            env,
            Envelope {
                origin: "arca/c/r".into(),
                index: 42,
                leaf_hash: hex::encode(merkle::leaf_hash(&entry)),
                entry,
            }
        );
    }

    #[test]
    fn outcomes_and_activities() {
        let denied = event(Operation::KvDestroy, Outcome::Denied);
        let v = to_ocsf("o", 0, &denied.encode(), &denied);
        assert_eq!((v["activity_name"].as_str(), v["status"].as_str()), (Some("Delete"), Some("Failure")));
        assert_eq!(v["status_detail"], "permission denied");
        let failed = event(Operation::KvWrite, Outcome::Error { code: "invalid".into() });
        let v = to_ocsf("o", 0, &failed.encode(), &failed);
        assert_eq!((v["activity_id"].as_u64(), v["status_code"].as_str()), (Some(1), Some("invalid")));
        // What a standby region pulls is a read of the replication feed.
        let pulled = event(Operation::RegionPull, Outcome::Ok);
        let v = to_ocsf("o", 0, &pulled.encode(), &pulled);
        assert_eq!(
            (v["activity_name"].as_str(), v["resources"][0]["type"].as_str()),
            (Some("Read"), Some("replication_feed"))
        );
        // Every operation maps to some activity; none panics.
        for op in Operation::ALL {
            let e = event(*op, Outcome::Ok);
            assert!(to_ocsf("o", 1, &e.encode(), &e)["activity_id"].as_u64().is_some());
        }
    }

    #[test]
    fn the_published_text_is_the_value_verify_recomputes() {
        let e = event(Operation::KvWrite, Outcome::Error { code: "invalid".into() });
        let entry = e.encode();
        let text = ocsf("o", 7, &entry, &e).to_json();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, to_ocsf("o", 7, &entry, &e));
        // No field is serialized twice, none as null.
        assert!(!text.contains("null"), "{text}");
    }

    #[test]
    fn source_ip_strips_ports() {
        assert_eq!(source_ip("10.1.2.3:80"), "10.1.2.3");
        assert_eq!(source_ip("[::1]:80"), "::1");
        assert_eq!(source_ip("::1"), "::1");
        assert_eq!(source_ip("unknown"), "unknown");
        assert_eq!(source_ip("local:arcad-dev"), "local:arcad-dev");
    }

    #[test]
    fn malformed_envelopes_are_errors() {
        assert_eq!(parse(b"{"), Err(EnvelopeError::NotJson));
        assert_eq!(envelope(&json!({})), Err(EnvelopeError::Field("arca")));
        assert_eq!(
            envelope(&json!({"arca": {"entry": "!!", "origin": "o", "leaf_index": 1, "leaf_hash": "h"}})),
            Err(EnvelopeError::Field("entry"))
        );
    }
}
