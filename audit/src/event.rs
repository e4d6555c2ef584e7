//! The audit event and its versioned, canonical binary encoding.
//!
//! Format v1, big-endian, fields in this order:
//!
//! ```text
//! u8      format version (1)
//! u64     time, milliseconds since the Unix epoch
//! str     request id
//! str     cluster, str region, str node
//! str     actor entity, opt<str> actor token accessor
//! str     source address, opt<str> proxy address (set when a trusted proxy header was honoured)
//! u8      operation code (see Operation)
//! str     path
//! opt<u64> secret version
//! u8      outcome (0 ok, 1 denied, 2 error) [, str error code when 2]
//! ```
//!
//! `str` is a u16 length then UTF-8 bytes; `opt<T>` is a tag byte 0 (absent) or 1 then `T`.
//! Decoding is strict: unknown versions, codes and tags, invalid UTF-8, over-long fields and
//! trailing bytes are errors, never panics.

use std::fmt;

/// The encoding version [`Event::encode`] writes.
pub const FORMAT_V1: u8 = 1;
/// Longest string field, in bytes.
pub const MAX_FIELD_BYTES: usize = 4096;

/// Who made the request. Never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The identity: `root`, `token:<display name>`, `approle:<role>`, `anonymous` when the
    /// request carried no valid token.
    pub entity: String,
    /// The token's accessor, a public handle for lookup and revocation.
    pub token_accessor: Option<String>,
}

/// Where the request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The client's address: the peer address, or the address named by a trusted proxy's
    /// header when one is configured and present.
    pub address: String,
    /// The proxy's own address, when the client address came from its header.
    pub proxy: Option<String>,
}

/// What happened to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Denied,
    /// Denied because a policy condition (or a token's bound CIDRs) did not hold: names it,
    /// e.g. `prod-read: source_cidrs` — never the policy's content.
    DeniedBy {
        condition: String,
    },
    /// Failed; the stable error code (never a message, which might echo input).
    Error {
        code: String,
    },
}

impl Outcome {
    /// A denial, with or without the condition that caused it.
    pub fn is_denied(&self) -> bool {
        matches!(self, Outcome::Denied | Outcome::DeniedBy { .. })
    }
}

macro_rules! operations {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $label:literal;)*) => {
        /// What the request asked for. Codes are stable: never reuse or renumber one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Operation {
            $($(#[$doc])* $name,)*
        }

        impl Operation {
            /// Every operation, for exhaustive tests and metrics.
            pub const ALL: &[Operation] = &[$(Operation::$name,)*];

            pub fn code(self) -> u8 {
                match self {
                    $(Operation::$name => $code,)*
                }
            }

            pub fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(Operation::$name),)*
                    _ => None,
                }
            }

            /// A stable name, `area.action`, for logs, metrics and exports.
            pub fn name(self) -> &'static str {
                match self {
                    $(Operation::$name => $label,)*
                }
            }
        }
    };
}

operations! {
    Init = 1, "operator.init";
    Unseal = 2, "operator.unseal";
    Seal = 3, "operator.seal";
    Status = 4, "operator.status";
    Rotate = 5, "operator.rotate";
    /// Seal migration between Shamir and an HSM (`arca operator migrate-seal`).
    SealMigrate = 6, "operator.seal_migrate";
    KvRead = 10, "kv.read";
    KvWrite = 11, "kv.write";
    KvPatch = 12, "kv.patch";
    KvList = 13, "kv.list";
    KvDelete = 14, "kv.delete";
    KvUndelete = 15, "kv.undelete";
    KvDestroy = 16, "kv.destroy";
    KvReadMetadata = 17, "kv.metadata.read";
    KvWriteMetadata = 18, "kv.metadata.write";
    KvDeleteMetadata = 19, "kv.metadata.delete";
    /// A rotation asked for on demand (`arca rotate`).
    KvRotate = 20, "kv.rotate";
    KvRotateCreate = 21, "kv.rotate.create";
    KvRotateSet = 22, "kv.rotate.set";
    KvRotateTest = 23, "kv.rotate.test";
    KvRotateFinish = 24, "kv.rotate.finish";
    KvRevoke = 25, "kv.revoke";
    /// A version's key structure, without its values (`<mount>/subkeys/<path>`).
    KvSubkeys = 26, "kv.subkeys";
    TokenCreate = 30, "token.create";
    TokenLookup = 31, "token.lookup";
    TokenRenew = 32, "token.renew";
    TokenRevoke = 33, "token.revoke";
    /// A token's capabilities on paths (`sys/capabilities-self`, `sys/capabilities`, …).
    TokenCapabilities = 34, "token.capabilities";
    AppRoleWrite = 40, "approle.write";
    AppRoleRead = 41, "approle.read";
    AppRoleSecretId = 42, "approle.secret_id";
    AppRoleLogin = 43, "approle.login";
    AppRoleDelete = 44, "approle.delete";
    AppRoleList = 45, "approle.list";
    PolicyWrite = 50, "policy.write";
    PolicyRead = 51, "policy.read";
    PolicyList = 52, "policy.list";
    PolicyDelete = 53, "policy.delete";
    CertRoleWrite = 60, "cert.role.write";
    CertRoleRead = 61, "cert.role.read";
    CertRoleDelete = 62, "cert.role.delete";
    CertLogin = 63, "cert.login";
    MountWrite = 70, "mount.write";
    MountRead = 71, "mount.read";
    MountDelete = 72, "mount.delete";
    MountList = 73, "mount.list";
    Health = 74, "operator.health";
    /// A request the API refused before any operation: unknown route, bad body.
    Rejected = 75, "api.rejected";
    RegionStatus = 80, "region.status";
    RegionPromote = 81, "region.promote";
    RegionDemote = 82, "region.demote";
    RegionDivergence = 83, "region.divergence";
    RegionDivergentSecrets = 84, "region.divergence.secrets";
    /// The replication listener: a standby's pull that shipped change records, or was refused.
    RegionPull = 85, "region.pull";
    /// The replication listener: a chunk of a snapshot served to a standby, or refused.
    RegionSnapshot = 86, "region.snapshot";
    /// The replication listener: a peer region's hello that was refused.
    RegionHello = 87, "region.hello";
    /// Just-in-time access (`arca access …`).
    AccessRequest = 90, "access.request";
    AccessApprove = 91, "access.approve";
    AccessExpire = 92, "access.expire";
    AccessList = 93, "access.list";
    /// Dynamic database credentials and their leases.
    DbConfigWrite = 100, "database.config.write";
    DbRoleWrite = 101, "database.role.write";
    DbCreds = 102, "database.creds";
    LeaseRenew = 103, "lease.renew";
    LeaseRevoke = 104, "lease.revoke";
    /// A lease revoked in its database and dropped (expiry, or after `lease.revoke`).
    LeaseReap = 105, "lease.reap";
    LeaseLookup = 106, "lease.lookup";
    DbConfigRead = 107, "database.config.read";
    DbConfigList = 108, "database.config.list";
    DbConfigDelete = 109, "database.config.delete";
    /// Response wrapping: a response stored under a single-use wrapping token.
    WrapCreate = 110, "wrapping.wrap";
    WrapUnwrap = 111, "wrapping.unwrap";
    WrapLookup = 112, "wrapping.lookup";
    /// A wrapped response dropped unread at the end of its TTL.
    WrapExpire = 113, "wrapping.expire";
    /// Dynamic database credentials' roles, read, listed and deleted.
    DbRoleRead = 114, "database.role.read";
    DbRoleList = 115, "database.role.list";
    DbRoleDelete = 116, "database.role.delete";
    /// A connection's admin password rotated (`database/rotate-root/<name>`).
    DbRotateRoot = 117, "database.rotate_root";
    /// Leases listed by id prefix (`sys/leases/lookup/<prefix>`).
    LeaseList = 118, "lease.list";
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time_unix_ms: u64,
    pub request_id: String,
    pub cluster: String,
    pub region: String,
    pub node: String,
    pub actor: Actor,
    pub source: Source,
    pub operation: Operation,
    /// The logical path the request named (`secret/data/app/db`, `auth/token/create`).
    pub path: String,
    /// The secret version read or written, when there is one.
    pub secret_version: Option<u64>,
    pub outcome: Outcome,
}

/// Why bytes are not a canonical encoded event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("unsupported event format version {0}")]
    UnknownVersion(u8),
    #[error("event ends early")]
    Truncated,
    #[error("unknown operation code {0}")]
    UnknownOperation(u8),
    #[error("bad tag {tag} for {field}")]
    BadTag { field: &'static str, tag: u8 },
    #[error("{field} is longer than {MAX_FIELD_BYTES} bytes")]
    FieldTooLong { field: &'static str },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{0} bytes after the end of the event")]
    TrailingBytes(usize),
}

/// An [`Event`] borrowed from its parts, for encoding without copying them first (the
/// request path encodes one per request). Encodes exactly as the owned event.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    pub time_unix_ms: u64,
    pub request_id: &'a str,
    pub cluster: &'a str,
    pub region: &'a str,
    pub node: &'a str,
    pub actor: &'a Actor,
    pub source: &'a Source,
    pub operation: Operation,
    pub path: &'a str,
    pub secret_version: Option<u64>,
    pub outcome: &'a Outcome,
}

impl EventRef<'_> {
    /// The canonical encoding (see [`Event::encode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.path.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.time_unix_ms.to_be_bytes());
        put_str(&mut out, self.request_id);
        put_str(&mut out, self.cluster);
        put_str(&mut out, self.region);
        put_str(&mut out, self.node);
        put_str(&mut out, &self.actor.entity);
        put_opt_str(&mut out, self.actor.token_accessor.as_deref());
        put_str(&mut out, &self.source.address);
        put_opt_str(&mut out, self.source.proxy.as_deref());
        out.push(self.operation.code());
        put_str(&mut out, self.path);
        match self.secret_version {
            None => out.push(0),
            Some(version) => {
                out.push(1);
                out.extend_from_slice(&version.to_be_bytes());
            }
        }
        match self.outcome {
            Outcome::Ok => out.push(0),
            Outcome::Denied => out.push(1),
            Outcome::DeniedBy { condition } => {
                out.push(3);
                put_str(&mut out, condition);
            }
            Outcome::Error { code } => {
                out.push(2);
                put_str(&mut out, code);
            }
        }
        out
    }
}

impl Event {
    /// The canonical encoding. Over-long string fields are cut at [`MAX_FIELD_BYTES`] (on a
    /// character boundary) so that encoding never fails and stays canonical.
    pub fn encode(&self) -> Vec<u8> {
        EventRef {
            time_unix_ms: self.time_unix_ms,
            request_id: &self.request_id,
            cluster: &self.cluster,
            region: &self.region,
            node: &self.node,
            actor: &self.actor,
            source: &self.source,
            operation: self.operation,
            path: &self.path,
            secret_version: self.secret_version,
            outcome: &self.outcome,
        }
        .encode()
    }

    /// The time field of an encoded event, without decoding the rest.
    pub fn peek_time_unix_ms(bytes: &[u8]) -> Option<u64> {
        if bytes.first() != Some(&FORMAT_V1) {
            return None;
        }
        Some(u64::from_be_bytes(bytes.get(1..9)?.try_into().ok()?))
    }

    /// The request id of an encoded event, without decoding the rest.
    pub fn peek_request_id(bytes: &[u8]) -> Option<&str> {
        if bytes.first() != Some(&FORMAT_V1) {
            return None;
        }
        let len = usize::from(u16::from_be_bytes(bytes.get(9..11)?.try_into().ok()?));
        std::str::from_utf8(bytes.get(11..11 + len)?).ok()
    }

    /// Decodes what [`Event::encode`] produced, and nothing else.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != FORMAT_V1 {
            return Err(DecodeError::UnknownVersion(version));
        }
        let time_unix_ms = r.u64()?;
        let request_id = r.str("request id")?;
        let cluster = r.str("cluster")?;
        let region = r.str("region")?;
        let node = r.str("node")?;
        let entity = r.str("actor entity")?;
        let token_accessor = r.opt_str("token accessor")?;
        let address = r.str("source address")?;
        let proxy = r.opt_str("proxy address")?;
        let code = r.u8()?;
        let operation = Operation::from_code(code).ok_or(DecodeError::UnknownOperation(code))?;
        let path = r.str("path")?;
        let secret_version = match r.u8()? {
            0 => None,
            1 => Some(r.u64()?),
            tag => return Err(DecodeError::BadTag { field: "secret version", tag }),
        };
        let outcome = match r.u8()? {
            0 => Outcome::Ok,
            1 => Outcome::Denied,
            2 => Outcome::Error { code: r.str("error code")? },
            3 => Outcome::DeniedBy { condition: r.str("denial condition")? },
            tag => return Err(DecodeError::BadTag { field: "outcome", tag }),
        };
        let left = bytes.len() - r.at;
        if left != 0 {
            return Err(DecodeError::TrailingBytes(left));
        }
        Ok(Event {
            time_unix_ms,
            request_id,
            cluster,
            region,
            node,
            actor: Actor { entity, token_accessor },
            source: Source { address, proxy },
            operation,
            path,
            secret_version,
            outcome,
        })
    }
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_FIELD_BYTES {
        return s;
    }
    let mut end = MAX_FIELD_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = truncate(s);
    // MAX_FIELD_BYTES < u16::MAX, so the length fits.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let raw = self.take(8)?;
        let mut buf = [0; 8];
        buf.copy_from_slice(raw);
        Ok(u64::from_be_bytes(buf))
    }

    fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let raw = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([raw[0], raw[1]]));
        if len > MAX_FIELD_BYTES {
            return Err(DecodeError::FieldTooLong { field });
        }
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    fn opt_str(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str(field)?)),
            tag => Err(DecodeError::BadTag { field, tag }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Event {
        Event {
            time_unix_ms: 1_764_000_000_000,
            request_id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
            cluster: "prod".into(),
            region: "eu-west".into(),
            node: "node-a".into(),
            actor: Actor { entity: "approle:billing".into(), token_accessor: Some("acc123".into()) },
            source: Source { address: "10.0.0.7:51234".into(), proxy: None },
            operation: Operation::KvRead,
            path: "secret/data/app/db".into(),
            secret_version: Some(3),
            outcome: Outcome::Ok,
        }
    }

    #[test]
    fn known_encoding_is_stable() {
        let bytes = sample().encode();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(&bytes[1..9], &1_764_000_000_000u64.to_be_bytes());
        assert_eq!(Event::decode(&bytes).unwrap(), sample());
    }

    #[test]
    fn peeking_agrees_with_decoding() {
        let bytes = sample().encode();
        assert_eq!(Event::peek_request_id(&bytes), Some(sample().request_id.as_str()));
        assert_eq!(Event::peek_time_unix_ms(&bytes), Some(sample().time_unix_ms));
        assert_eq!(Event::peek_request_id(&bytes[..12]), None);
    }

    #[test]
    fn operation_codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for op in Operation::ALL {
            assert!(seen.insert(op.code()), "duplicate code {}", op.code());
            assert_eq!(Operation::from_code(op.code()), Some(*op));
        }
    }

    #[test]
    fn rejects_what_encode_would_not_produce() {
        let bytes = sample().encode();
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(Event::decode(&trailing), Err(DecodeError::TrailingBytes(1)));
        let mut version = bytes.clone();
        version[0] = 2;
        assert_eq!(Event::decode(&version), Err(DecodeError::UnknownVersion(2)));
        for cut in 0..bytes.len() {
            assert!(Event::decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
    }

    #[test]
    fn overlong_fields_are_cut_on_a_character_boundary() {
        let mut event = sample();
        event.path = "é".repeat(MAX_FIELD_BYTES);
        let decoded = Event::decode(&event.encode()).unwrap();
        assert!(decoded.path.len() <= MAX_FIELD_BYTES);
        assert!(event.path.starts_with(&decoded.path));
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            Just(Outcome::Ok),
            Just(Outcome::Denied),
            "[a-z_: -]{0,24}".prop_map(|condition| Outcome::DeniedBy { condition }),
            "[a-z_]{0,12}".prop_map(|code| Outcome::Error { code }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(time in any::<u64>(), id in ".{0,40}", path in ".{0,80}",
                       accessor in proptest::option::of("[a-f0-9]{0,24}"),
                       proxy in proptest::option::of("[0-9.:]{0,21}"),
                       version in proptest::option::of(any::<u64>()),
                       op in proptest::sample::select(Operation::ALL), outcome in outcome()) {
            let event = Event {
                time_unix_ms: time,
                request_id: id,
                cluster: "c".into(),
                region: "r".into(),
                node: "n".into(),
                actor: Actor { entity: "token:x".into(), token_accessor: accessor },
                source: Source { address: "127.0.0.1:1".into(), proxy },
                operation: op,
                path,
                secret_version: version,
                outcome,
            };
            prop_assert_eq!(Event::decode(&event.encode()).unwrap(), event);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(event) = Event::decode(&bytes) {
                prop_assert_eq!(event.encode(), bytes, "accepted bytes must be canonical");
            }
        }
    }
}
