//! The node's keyspace, tuple-encoded, one prefix per concern:
//!
//! | key | value |
//! | --- | --- |
//! | `("sys","seal")` | seal parameters and the sealed root key (JSON) |
//! | `("sys","keyring")` | the keyring, encrypted under the root key |
//! | `("sys","token",<sha256>)` | token record (barrier) |
//! | `("sys","accessor",<accessor>)` | token hash (barrier) |
//! | `("sys","child",<parent accessor>,<child accessor>)` | empty: revocation tree |
//! | `("sys","policy",<name>)` | policy text (barrier) |
//! | `("sys","approle",<name>)` | role (barrier) |
//! | `("sys","approle-id",<sha256 of role id>)` | role name (barrier) |
//! | `("sys","secret-id",<role>,<sha256 of secret id>)` | secret id record (barrier) |
//! | `("sys","cert-role",<name>)` | certificate role (barrier) |
//! | `("sys","cert-fp",<sha256 of the certificate>)` | certificate role name (barrier) |
//! | `("sys","mount",<name>)` | a KV v2 mount (JSON, plain: no secrets) |
//! | `("kv",<mount>,"m",<path>)` | secret metadata (barrier) |
//! | `("kv",<mount>,"s",<path>,<slot>)` | secret version data (barrier, bound to the version: see below) |
//! | `("kv",<mount>,"v",<path>,<version>)` | secret version data written before slots (barrier) |
//! | `("audit",<region>,"e",<versionstamp>)` | encoded audit event (plain: no secrets), in log order |
//! | `("audit",<region>,"rid",<request id>)` | leaf index of the request's event (written by the sequencer) |
//! | `("audit",<region>,"state")` | sequencer state: size, right edge, cursor, last checkpoint |
//! | `("audit",<region>,"lease")` | sequencer leadership lease |
//! | `("audit",<region>,"tile",<level>,<index>)` | a hash tile (its current width) |
//! | `("audit",<region>,"bundle",<index>)` | versionstamp of the first entry of entry bundle `index` |
//! | `("audit",<region>,"batch",<versionstamp>)` | leaf index of the first entry of an integrated batch |
//! | `("audit",<region>,"vkey")` | the log's verifier key (public) |
//! | `("audit",<region>,"archive")` | the archiver's progress: bundles archived and pruned (JSON) |
//! | `("audit",<region>,"archive-lease")` | the archiver's lease |
//! | `("audit",<region>,"cp",<size>)` | every signed checkpoint, by tree size (public) |
//! | `("region",…)`, `("changes",…)`, `("replica",…)` | replication: see `arca_replication` |
//! | `("region","applier-lease")` | the lease of the standby node that applies the feed |
//! | `("siem",<region>,"cursor")` | the SIEM exporter's delivered position (JSON) |
//! | `("siem",<region>,"lease")` | the SIEM exporter's lease: one active exporter per region |
//! | `("sys","audit-key",<region>)` | the log's signing key seed (barrier) |
//!
//! Every barrier value is encrypted with its own key as AAD, but for a secret version's
//! row under a slot: its AAD is the version's own key, [`kv_version`], so a row copied into
//! another slot (or another version's place) does not decrypt.

use arca_store::tuple::{Element, Part, encode_into, pack, pack_parts};

pub fn seal() -> Vec<u8> {
    pack(&["sys".into(), "seal".into()])
}

pub fn keyring() -> Vec<u8> {
    pack(&["sys".into(), "keyring".into()])
}

pub fn token(hash: &[u8]) -> Vec<u8> {
    pack_parts(&[Part::Str("sys"), Part::Str("token"), Part::Bytes(hash)])
}

/// A wrapped response, by its wrapping token's hash ([`crate::wrapping`]).
pub fn wrap(hash: &[u8]) -> Vec<u8> {
    pack_parts(&[Part::Str("sys"), Part::Str("wrap"), Part::Bytes(hash)])
}

/// The wrapped responses by expiry, for the scheduler's sweep: `(…, expiry ms, hash)`.
pub fn wrap_expiry(expires_unix_ms: u64, hash: &[u8]) -> Vec<u8> {
    pack(&["sys".into(), "wrap-expiry".into(), expires_unix_ms.into(), hash.into()])
}

pub fn wrap_expiry_all() -> Vec<u8> {
    pack(&["sys".into(), "wrap-expiry".into()])
}

pub fn accessor(accessor: &str) -> Vec<u8> {
    pack(&["sys".into(), "accessor".into(), accessor.into()])
}

pub fn children(parent: &str) -> Vec<u8> {
    pack(&["sys".into(), "child".into(), parent.into()])
}

pub fn child(parent: &str, child: &str) -> Vec<u8> {
    pack(&["sys".into(), "child".into(), parent.into(), child.into()])
}

pub fn policies() -> Vec<u8> {
    pack(&["sys".into(), "policy".into()])
}

/// A database connection (sealed JSON; holds the admin URL).
pub fn db_connection(name: &str) -> Vec<u8> {
    pack(&["sys".into(), "db".into(), "conn".into(), name.into()])
}

/// A database role (sealed JSON).
pub fn db_role(name: &str) -> Vec<u8> {
    pack(&["sys".into(), "db".into(), "role".into(), name.into()])
}

/// A lease (sealed JSON).
pub fn lease(id: &str) -> Vec<u8> {
    pack(&["sys".into(), "lease".into(), "id".into(), id.into()])
}

pub fn lease_prefix() -> Vec<u8> {
    pack(&["sys".into(), "lease".into(), "id".into()])
}

/// The start of the keys of every lease whose id starts with `text` (a tuple's string ends
/// with a 0x00 terminator; without it, the bytes are a prefix of every longer string's).
pub fn lease_id_prefix(text: &str) -> Vec<u8> {
    let mut key = lease(text);
    key.pop();
    key
}

/// Every database connection (`db_connection` under it).
pub fn db_connections() -> Vec<u8> {
    pack(&["sys".into(), "db".into(), "conn".into()])
}

/// A connection whose admin password rotation was interrupted (plaintext, empty): what
/// the scheduler finishes without decrypting every connection each round.
pub fn db_rotation_pending(name: &str) -> Vec<u8> {
    pack(&["sys".into(), "db".into(), "pending".into(), name.into()])
}

pub fn db_rotations_pending() -> Vec<u8> {
    pack(&["sys".into(), "db".into(), "pending".into()])
}

/// Every database role (`db_role` under it).
pub fn db_roles() -> Vec<u8> {
    pack(&["sys".into(), "db".into(), "role".into()])
}

/// The reaper's index: leases by expiry.
pub fn lease_expiry(expire_unix_ms: u64, id: &str) -> Vec<u8> {
    pack(&["sys".into(), "lease".into(), "exp".into(), expire_unix_ms.into(), id.into()])
}

pub fn lease_expiry_prefix() -> Vec<u8> {
    pack(&["sys".into(), "lease".into(), "exp".into()])
}

/// The quota's index: leases by owner.
pub fn lease_owner(entity: &str, role: &str, id: &str) -> Vec<u8> {
    pack(&["sys".into(), "lease".into(), "owner".into(), entity.into(), role.into(), id.into()])
}

/// The leases `entity` holds on `role`.
pub fn lease_owner_prefix(entity: &str, role: &str) -> Vec<u8> {
    pack(&["sys".into(), "lease".into(), "owner".into(), entity.into(), role.into()])
}

/// A just-in-time access grant (sealed JSON).
pub fn access_grant(id: &str) -> Vec<u8> {
    pack(&["sys".into(), "access".into(), "grant".into(), id.into()])
}

pub fn access_grant_prefix() -> Vec<u8> {
    pack(&["sys".into(), "access".into(), "grant".into()])
}

/// An approved grant, indexed by the requester's token accessor.
pub fn access_active(accessor: &str, id: &str) -> Vec<u8> {
    pack(&["sys".into(), "access".into(), "active".into(), accessor.into(), id.into()])
}

pub fn access_active_prefix(accessor: &str) -> Vec<u8> {
    pack(&["sys".into(), "access".into(), "active".into(), accessor.into()])
}

pub fn access_active_all() -> Vec<u8> {
    pack(&["sys".into(), "access".into(), "active".into()])
}

pub fn policy(name: &str) -> Vec<u8> {
    pack(&["sys".into(), "policy".into(), name.into()])
}

pub fn approles() -> Vec<u8> {
    pack(&["sys".into(), "approle".into()])
}

pub fn approle(name: &str) -> Vec<u8> {
    pack(&["sys".into(), "approle".into(), name.into()])
}

pub fn approle_id(role_id_hash: &[u8]) -> Vec<u8> {
    pack(&["sys".into(), "approle-id".into(), Element::Bytes(role_id_hash.to_vec())])
}

pub fn secret_ids(role: &str) -> Vec<u8> {
    pack(&["sys".into(), "secret-id".into(), role.into()])
}

pub fn secret_id(role: &str, secret_id_hash: &[u8]) -> Vec<u8> {
    pack(&["sys".into(), "secret-id".into(), role.into(), Element::Bytes(secret_id_hash.to_vec())])
}

pub fn cert_role(name: &str) -> Vec<u8> {
    pack(&["sys".into(), "cert-role".into(), name.into()])
}

pub fn cert_fingerprint(fingerprint: &[u8]) -> Vec<u8> {
    pack(&["sys".into(), "cert-fp".into(), Element::Bytes(fingerprint.to_vec())])
}

pub fn mounts() -> Vec<u8> {
    pack(&["sys".into(), "mount".into()])
}

pub fn mount(name: &str) -> Vec<u8> {
    pack_parts(&[Part::Str("sys"), Part::Str("mount"), Part::Str(name)])
}

/// Every key of a KV mount's data.
pub fn kv_mount(mount: &str) -> Vec<u8> {
    pack(&["kv".into(), mount.into()])
}

pub fn kv_meta(mount: &str, path: &str) -> Vec<u8> {
    pack_parts(&[Part::Str("kv"), Part::Str(mount), Part::Str("m"), Part::Str(path)])
}

/// The key prefix of every metadata key whose path starts with `prefix` (the string
/// element is left open, so the range covers every continuation of it).
pub fn kv_meta_prefix(mount: &str, prefix: &str) -> Vec<u8> {
    let mut key = pack(&["kv".into(), mount.into(), "m".into()]);
    key.push(0x02); // the tuple layer's string code, without the terminator
    key.extend_from_slice(prefix.as_bytes());
    key
}

/// A version's own key: where rows written before slots live, and every version row's AAD.
pub fn kv_version(mount: &str, path: &str, version: u64) -> Vec<u8> {
    pack_parts(&[Part::Str("kv"), Part::Str(mount), Part::Str("v"), Part::Str(path), Part::UInt(version)])
}

/// The row a version lives in when its metadata gives it a slot: a new version takes the
/// slot of the version it prunes, so the row keeps its key (the store rewrites the value
/// alone, and its key index is not touched).
pub fn kv_slot(mount: &str, path: &str, slot: u32) -> Vec<u8> {
    pack_parts(&[Part::Str("kv"), Part::Str(mount), Part::Str("s"), Part::Str(path), Part::UInt(slot.into())])
}

/// The prefix of every slot row of one secret.
pub fn kv_slots(mount: &str, path: &str) -> Vec<u8> {
    pack_parts(&[Part::Str("kv"), Part::Str(mount), Part::Str("s"), Part::Str(path)])
}

/// The region's event queue: every event, sequenced and not yet sequenced, in versionstamp
/// order — which is leaf order.
pub fn audit_events(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "e".into()])
}

/// Request ids are hex; the index stores their bytes (half the key, so fewer pages to
/// write per integrated entry).
pub fn audit_rid(region: &str, request_id: &str) -> Vec<u8> {
    audit_rid_under(&audit_rid_prefix(region), request_id)
}

/// [`audit_rid`] under its region's [`audit_rid_prefix`], built once by a caller that
/// indexes many ids (the sequencer, where building each key whole was ~1.8% of the
/// committer's samples).
pub fn audit_rid_under(prefix: &[u8], request_id: &str) -> Vec<u8> {
    let id = match hex::decode(request_id) {
        Ok(bytes) => Element::Bytes(bytes),
        Err(_) => Element::from(request_id),
    };
    let mut key = Vec::with_capacity(prefix.len() + request_id.len() + 2);
    key.extend_from_slice(prefix);
    encode_into(&mut key, &id);
    key
}

/// A page of the request-id index: the `(request id, leaf index)` pairs of one sequencer
/// step whose ids fall in one time bucket (request ids start with 48 bits of milliseconds),
/// keyed by the bucket and the leaf index of the page's first pair. One key per step and
/// bucket, against one per entry in [`audit_rid`]'s index, which keeps serving the entries
/// sequenced before the pages (and ids that are not 16 bytes of hex).
pub fn audit_rid_page(region: &str, bucket: u64, first_index: u64) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "ridp".into(), bucket.into(), first_index.into()])
}

/// The pages of one time bucket.
pub fn audit_rid_bucket(region: &str, bucket: u64) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "ridp".into(), bucket.into()])
}

/// Every page of a region's request-id index.
pub fn audit_rid_pages(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "ridp".into()])
}

/// Every request-id index key of a region (they sort by time: request ids start with 48
/// bits of milliseconds).
pub fn audit_rid_prefix(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "rid".into()])
}

pub fn audit_state(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "state".into()])
}

/// The rotation scheduler's index: one key per secret with a rotation policy. Under `sys`,
/// so it replicates: a promoted standby's scheduler carries on.
pub fn rotation_index(mount: &str, path: &str) -> Vec<u8> {
    pack(&["sys".into(), "rotation".into(), "index".into(), mount.into(), path.into()])
}

pub fn rotation_index_prefix() -> Vec<u8> {
    pack(&["sys".into(), "rotation".into(), "index".into()])
}

/// The rotation scheduler's lease (one active scheduler per region).
pub fn rotation_lease(region: &str) -> Vec<u8> {
    pack(&["rotation".into(), "lease".into(), region.into()])
}

pub fn audit_lease(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "lease".into()])
}

pub fn audit_tile(region: &str, level: u32, index: u64) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "tile".into(), level.into(), index.into()])
}

pub fn audit_bundle(region: &str, index: u64) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "bundle".into(), index.into()])
}

pub fn audit_batches(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "batch".into()])
}

/// The archiver's progress (JSON).
pub fn audit_archive(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "archive".into()])
}

pub fn audit_archive_lease(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "archive-lease".into()])
}

pub fn audit_vkey(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "vkey".into()])
}

/// Every signed checkpoint of a region, in size order.
pub fn audit_checkpoints(region: &str) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "cp".into()])
}

pub fn audit_checkpoint_at(region: &str, size: u64) -> Vec<u8> {
    pack(&["audit".into(), region.into(), "cp".into(), size.into()])
}

/// The lease of the node that applies the primary's feed in a standby region.
pub fn region_applier_lease() -> Vec<u8> {
    pack(&["region".into(), "applier-lease".into()])
}

pub fn siem_cursor(region: &str) -> Vec<u8> {
    pack(&["siem".into(), region.into(), "cursor".into()])
}

pub fn siem_lease(region: &str) -> Vec<u8> {
    pack(&["siem".into(), region.into(), "lease".into()])
}

pub fn audit_signing_key(region: &str) -> Vec<u8> {
    pack(&["sys".into(), "audit-key".into(), region.into()])
}

/// The range of every key that extends `prefix` with more tuple elements.
pub fn children_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut begin = prefix.to_vec();
    begin.push(0x00);
    let mut end = prefix.to_vec();
    end.push(0xFF);
    (begin, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request-id index keys stay byte for byte what earlier releases stored.
    #[test]
    fn request_id_keys_are_the_packed_tuple() {
        for (id, element) in [
            (
                "0193a1b2c3d4e5f60718293a4b5c6d7e",
                Element::Bytes(hex::decode("0193a1b2c3d4e5f60718293a4b5c6d7e").unwrap()),
            ),
            ("00ff00", Element::Bytes(vec![0, 0xff, 0])),
            ("not-hex", Element::from("not-hex")),
        ] {
            let expected = pack(&["audit".into(), "eu".into(), "rid".into(), element]);
            assert_eq!(audit_rid("eu", id), expected, "{id}");
            assert_eq!(audit_rid_under(&audit_rid_prefix("eu"), id), expected, "{id}");
            assert!(expected.starts_with(&audit_rid_prefix("eu")));
        }
    }

    #[test]
    fn a_lease_id_prefix_starts_the_keys_of_the_ids_it_starts() {
        let prefix = lease_id_prefix("database/creds/ro/");
        assert!(lease("database/creds/ro/abc").starts_with(&prefix));
        assert!(lease("database/creds/ro/").starts_with(&prefix));
        for other in ["database/creds/ro2/abc", "database/creds/r/abc", "database/creds/ro"] {
            assert!(!lease(other).starts_with(&prefix), "{other}");
        }
    }
}
