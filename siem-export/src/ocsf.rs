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
use serde_json::{Value, json};

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

    /// What an operation does to the resource it names.
    pub fn of(op: Operation) -> Activity {
        use Operation::*;
        match op {
            KvWrite | TokenCreate | AppRoleSecretId => Activity::Create,
            KvRead | KvList | KvReadMetadata | TokenLookup | AppRoleRead | AppRoleList | PolicyRead
            | PolicyList | CertRoleRead | MountRead | MountList | Status | Health => Activity::Read,
            KvPatch | KvUndelete | KvWriteMetadata | TokenRenew | AppRoleWrite | PolicyWrite
            | CertRoleWrite | MountWrite | Rotate => Activity::Update,
            KvDelete | KvDestroy | KvDeleteMetadata | TokenRevoke | AppRoleDelete | PolicyDelete
            | CertRoleDelete | MountDelete => Activity::Delete,
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
        _ => "system",
    }
}

/// `src_endpoint` from the recorded source: `ip:port`, a bare ip, or a label (`unknown`).
fn endpoint(address: &str) -> Value {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        json!({ "ip": sa.ip().to_string(), "port": sa.port() })
    } else if let Ok(ip) = address.parse::<IpAddr>() {
        json!({ "ip": ip.to_string() })
    } else {
        json!({ "name": address })
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

/// The OCSF event for leaf `index` of the log `origin`, whose entry is `entry` (decoded as
/// `event`).
pub fn to_ocsf(origin: &str, index: u64, entry: &[u8], event: &Event) -> Value {
    let activity = Activity::of(event.operation);
    let (status_id, status, severity_id, severity) = match &event.outcome {
        Outcome::Ok => (1, "Success", 1, "Informational"),
        Outcome::Denied => (2, "Failure", 3, "Medium"),
        Outcome::Error { .. } => (2, "Failure", 2, "Low"),
    };
    let mut value = json!({
        "class_uid": CLASS_UID,
        "class_name": "API Activity",
        "category_uid": CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": activity as u32,
        "activity_name": activity.name(),
        "type_uid": CLASS_UID * 100 + activity as u32,
        "type_name": format!("API Activity: {}", activity.name()),
        "time": event.time_unix_ms,
        "severity_id": severity_id,
        "severity": severity,
        "status_id": status_id,
        "status": status,
        "metadata": {
            "version": OCSF_VERSION,
            "uid": event.request_id,
            "log_name": origin,
            "product": { "name": "arca", "vendor_name": "arca", "version": env!("CARGO_PKG_VERSION") },
        },
        "actor": {
            "user": { "name": event.actor.entity, "uid": event.actor.entity },
        },
        "api": {
            "operation": event.operation.name(),
            "service": { "name": "arca" },
            "request": { "uid": event.request_id },
        },
        "src_endpoint": endpoint(&event.source.address),
        "dst_endpoint": { "hostname": event.node, "svc_name": "arca" },
        "cloud": { "provider": "arca", "region": event.region },
        "resources": [ { "name": event.path, "uid": event.path, "type": resource_type(event.operation) } ],
        "arca": {
            "origin": origin,
            "leaf_index": index,
            "leaf_hash": hex::encode(merkle::leaf_hash(entry)),
            "entry": B64.encode(entry),
            "cluster": event.cluster,
            "region": event.region,
            "node": event.node,
        },
    });
    if let Some(accessor) = &event.actor.token_accessor {
        value["actor"]["session"] = json!({ "uid": accessor });
    }
    if let Some(proxy) = &event.source.proxy {
        value["src_endpoint"]["intermediate_ips"] = json!([source_ip(proxy)]);
    }
    if let Some(version) = event.secret_version {
        value["resources"][0]["version"] = json!(version.to_string());
    }
    match &event.outcome {
        Outcome::Ok => {}
        Outcome::Denied => value["status_detail"] = json!("permission denied"),
        Outcome::Error { code } => value["status_code"] = json!(code),
    }
    value
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
        // Every operation maps to some activity; none panics.
        for op in Operation::ALL {
            let e = event(*op, Outcome::Ok);
            assert!(to_ocsf("o", 1, &e.encode(), &e)["activity_id"].as_u64().is_some());
        }
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
