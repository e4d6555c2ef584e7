//! Versioned secrets with KV v2 semantics.
//!
//! Each secret has metadata (current version, max versions, check-and-set requirement,
//! custom metadata, per-version created/deleted/destroyed state) and up to `max_versions`
//! versions of data — a JSON object: string keys, values of any JSON type (strings mostly;
//! objects, arrays, numbers, booleans and null as Vault's KV v2 allows). Everything is stored through the barrier,
//! each value bound (AAD) to its own key, and a version's data to the version's own key,
//! [`keys::kv_version`]: path and version.
//!
//! A version's data lives in a slot row, [`keys::kv_slot`], named in its [`VersionMeta`]: a
//! new version takes the slot of the version it prunes, so a write that prunes rewrites one
//! row's value and leaves the store's key index alone. Invariant: no two versions of a
//! secret share a slot. Versions written before slots have none and stay at their own key
//! until pruned.
//!
//! Policies see Vault's paths: `<mount>/data/<path>` for data, `<mount>/metadata/<path>` for
//! metadata and listing, `<mount>/delete|undelete|destroy/<path>` for version management.
//!
//! A read returns ciphertext from the transaction; it is decrypted only after the request's
//! audit event committed (the audit-first rule), by [`Node::kv_read`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arca_audit::Operation;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::error::ApiError;
use crate::keys;
use crate::node::{Audited, Env, Node, RequestContext};
use crate::policy::Capability;

/// The mount every store starts with.
pub const DEFAULT_MOUNT: &str = "secret";
/// Longest secret path, in bytes.
pub const MAX_PATH_BYTES: usize = 512;
/// Largest secret: its data encoded as JSON, in bytes.
pub const MAX_DATA_BYTES: usize = 64 * 1024;
/// Most keys in one secret.
pub const MAX_DATA_KEYS: usize = 256;
/// Deepest nesting of a value: a string is depth 0, `{"a": "b"}` depth 1.
pub const MAX_VALUE_DEPTH: usize = 32;
/// Versions kept when max_versions is 0 (unset).
pub const DEFAULT_MAX_VERSIONS: u32 = 10;
const MAX_CUSTOM_METADATA: usize = 64;
const MAX_LIST_KEYS: usize = 10_000;

/// A secret's data: a JSON object. Redacted in `Debug`; its strings, nested ones too, are
/// zeroized on drop (numbers and booleans live inline, and keys are not secret).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretData(pub BTreeMap<String, serde_json::Value>);

impl<K: Into<String>, V: Into<serde_json::Value>> FromIterator<(K, V)> for SecretData {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        SecretData(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

impl SecretData {
    /// A field's value if it is a string.
    pub fn text(&self, field: &str) -> Option<&str> {
        self.0.get(field).and_then(serde_json::Value::as_str)
    }
}

impl std::fmt::Debug for SecretData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretData").field("keys", &self.0.len()).finish_non_exhaustive()
    }
}

impl Drop for SecretData {
    fn drop(&mut self) {
        for value in self.0.values_mut() {
            scrub(value);
        }
    }
}

/// Zeroizes a value's strings, nested ones too (depth bounded by the parser and
/// [`MAX_VALUE_DEPTH`]).
pub fn scrub(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(scrub),
        Value::Object(map) => map.values_mut().for_each(scrub),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// RFC 7396 JSON merge patch, as Vault's KV v2 PATCH applies it: an object patch merges
/// into an object (a null member removes that member), anything else replaces the target.
pub fn merge_patch(target: serde_json::Value, patch: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match patch {
        Value::Object(members) => {
            let mut merged = match target {
                Value::Object(map) => map,
                mut other => {
                    scrub(&mut other);
                    serde_json::Map::new()
                }
            };
            for (name, value) in members {
                if value.is_null() {
                    if let Some(mut gone) = merged.remove(&name) {
                        scrub(&mut gone);
                    }
                } else {
                    let old = merged.remove(&name).unwrap_or(Value::Null);
                    merged.insert(name, merge_patch(old, value));
                }
            }
            Value::Object(merged)
        }
        replacement => {
            let mut old = target;
            scrub(&mut old);
            replacement
        }
    }
}

/// State of one version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionMeta {
    pub created_unix_ms: u64,
    pub deletion_unix_ms: Option<u64>,
    pub destroyed: bool,
    /// Revoked: never served again, on any node of any region (`arca kv revoke`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
    /// The slot row holding the data ([`keys::kv_slot`]); none: the version's own key
    /// ([`keys::kv_version`], rows written before slots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
}

impl VersionMeta {
    /// Deleted by `now`: soft-deleted, or past the deletion time a `delete_version_after`
    /// set when it was written.
    pub fn is_deleted(&self, now_unix_ms: u64) -> bool {
        self.deletion_unix_ms.is_some_and(|t| t <= now_unix_ms)
    }

    /// Where the version's data is stored. Its AAD is always [`keys::kv_version`].
    pub fn data_key(&self, mount: &str, path: &str, version: u64) -> Vec<u8> {
        match self.slot {
            Some(slot) => keys::kv_slot(mount, path, slot),
            None => keys::kv_version(mount, path, version),
        }
    }
}

/// A secret's metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Metadata {
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub current_version: u64,
    pub max_versions: u32,
    pub cas_required: bool,
    pub custom_metadata: BTreeMap<String, String>,
    pub versions: BTreeMap<u64, VersionMeta>,
    /// Each new version is deleted this long after it is written (0: the mount's setting).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delete_version_after_secs: u64,
    /// Rotation stages: `current`, `previous`, `pending` → version. Readers get `current`
    /// unless they ask for a version or another stage.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stages: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<crate::lifecycle::RotationPolicy>,
    /// A rotation under way: which step is next (resumable after a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_state: Option<crate::lifecycle::RotationState>,
}

/// Stage names.
pub const STAGE_CURRENT: &str = "current";
pub const STAGE_PREVIOUS: &str = "previous";
pub const STAGE_PENDING: &str = "pending";

/// Which version a read wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The `current` stage.
    Current,
    Version(u64),
    Stage(String),
}

impl Selector {
    /// Vault's `?version=`: absent or 0 is the current version.
    pub fn version(version: Option<u64>) -> Self {
        match version {
            Some(0) | None => Selector::Current,
            Some(v) => Selector::Version(v),
        }
    }
}

/// How a new version takes its place among the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewVersionStage {
    /// An ordinary write: it becomes `current`, the old current becomes `previous`.
    Current,
    /// A rotation's new version: `pending` until the rotation finishes.
    Pending,
}

impl Metadata {
    /// The version a stage names (`current` defaults to the newest version).
    pub fn stage(&self, name: &str) -> Option<u64> {
        match self.stages.get(name) {
            Some(v) => Some(*v),
            None if name == STAGE_CURRENT && self.current_version > 0 => Some(self.current_version),
            None => None,
        }
    }

    pub fn oldest_version(&self) -> u64 {
        self.versions.keys().next().copied().unwrap_or(0)
    }

    /// Versions kept: the secret's own maximum, else the mount's, else 10.
    fn effective_max_versions(&self, mount: &KvConfig) -> usize {
        match (self.max_versions, mount.max_versions) {
            (0, 0) => DEFAULT_MAX_VERSIONS as usize,
            (0, m) | (m, _) => m as usize,
        }
    }
}

/// A version read: its data and state.
#[derive(Debug, Clone)]
pub struct SecretVersion {
    pub data: SecretData,
    pub version: u64,
    pub meta: VersionMeta,
    pub custom_metadata: BTreeMap<String, String>,
}

/// A version read with its data as stored: the JSON object [`SecretData`] was written as,
/// decrypted (authenticated by the barrier). Redacted in `Debug`, zeroized on drop.
pub struct PlainVersion {
    pub json: Zeroizing<Vec<u8>>,
    pub version: u64,
    pub meta: VersionMeta,
    pub custom_metadata: BTreeMap<String, String>,
}

impl PlainVersion {
    /// The data, parsed.
    pub fn parse(self) -> Result<SecretVersion, ApiError> {
        let data: SecretData = serde_json::from_slice(&self.json).map_err(|_| ApiError::Internal)?;
        Ok(SecretVersion {
            data,
            version: self.version,
            meta: self.meta,
            custom_metadata: self.custom_metadata,
        })
    }
}

impl std::fmt::Debug for PlainVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainVersion")
            .field("json_bytes", &self.json.len())
            .field("version", &self.version)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// Metadata changes; `None` leaves a field as is.
#[derive(Debug, Clone, Default)]
pub struct MetadataUpdate {
    pub max_versions: Option<u32>,
    pub cas_required: Option<bool>,
    pub custom_metadata: Option<BTreeMap<String, String>>,
    pub delete_version_after_secs: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A KV mount's settings (`<mount>/config`), the defaults of its secrets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvConfig {
    /// Versions kept when a secret sets none (0: 10).
    #[serde(default)]
    pub max_versions: u32,
    /// Every write to the mount must give `cas`.
    #[serde(default)]
    pub cas_required: bool,
    /// Each new version is deleted this long after it is written, when its secret sets no
    /// such time of its own (0: never).
    #[serde(default)]
    pub delete_version_after_secs: u64,
}

/// Longest `delete_version_after`: 100 years.
pub const MAX_DELETE_VERSION_AFTER_SECS: u64 = 100 * 365 * 86_400;

/// Changes to a mount's settings; `None` leaves one as is.
#[derive(Debug, Clone, Default)]
pub struct KvConfigUpdate {
    pub max_versions: Option<u32>,
    pub cas_required: Option<bool>,
    pub delete_version_after_secs: Option<u64>,
}

/// Mount names that belong to the system (a mount's first segment may not be one).
pub const RESERVED_MOUNTS: &[&str] = &["sys", "auth", "audit", "identity", "cubbyhole", "v1"];

/// Segment names a mount may not hold: KV v2's own path words. The HTTP API finds where a
/// mount ends by the first of them (`team/kv/data/app/db`: mount `team/kv`).
pub const KV_VERBS: &[&str] = &["data", "metadata", "delete", "undelete", "destroy", "subkeys", "config"];

/// Longest mount name, in bytes.
pub const MAX_MOUNT_BYTES: usize = 128;

/// The key structure of `fields`: nested objects followed `depth` levels (0: all), every
/// other value `null`. The values are scrubbed as they are dropped.
pub fn subkeys(fields: &mut BTreeMap<String, serde_json::Value>, depth: usize) -> serde_json::Value {
    fn walk(value: &mut serde_json::Value, left: usize) -> serde_json::Value {
        match value {
            serde_json::Value::Object(members) if left != 1 => serde_json::Value::Object(
                members.iter_mut().map(|(k, v)| (k.clone(), walk(v, left.saturating_sub(1)))).collect(),
            ),
            other => {
                scrub(other);
                serde_json::Value::Null
            }
        }
    }
    serde_json::Value::Object(
        std::mem::take(fields).into_iter().map(|(k, mut v)| (k, walk(&mut v, depth))).collect(),
    )
}

/// Checks a mount name's syntax: up to 128 bytes of segments separated by single `/`, each
/// 1–64 characters from a-z, 0-9, '-', '_', '.' (not `.` or `..`, nor one of [`KV_VERBS`]);
/// the first segment not a reserved name.
pub fn validate_mount(mount: &str) -> Result<(), ApiError> {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
            && s != "."
            && s != ".."
            && !KV_VERBS.contains(&s)
    };
    let ok = mount.len() <= MAX_MOUNT_BYTES
        && mount.split('/').all(segment_ok)
        && !RESERVED_MOUNTS.contains(&mount.split('/').next().unwrap_or_default());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "mount: up to 128 bytes of '/'-separated segments of 1 to 64 characters from a-z, 0-9, '-', '_', '.' \
             (not a reserved name, nor data, metadata, delete, undelete, destroy, subkeys or config)",
        ))
    }
}

/// A KV v2 mount as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mount {
    pub name: String,
    pub description: String,
    pub created_unix_ms: u64,
    #[serde(default)]
    pub config: KvConfig,
}

/// A mount's settings (inside the request's transaction; the mount must exist).
pub(crate) fn mount_config(env: &mut Env<'_>, mount: &str) -> Result<KvConfig, ApiError> {
    let raw = env
        .tx
        .get(&keys::mount(mount))?
        .ok_or_else(|| ApiError::NotFound(format!("no secrets engine mounted at {mount}/")))?;
    let stored: Mount = serde_json::from_slice(&raw).map_err(|_| ApiError::Internal)?;
    Ok(stored.config)
}

/// Checks the mount's syntax and that it exists (inside the request's transaction).
fn check_mount(env: &mut Env<'_>, mount: &str) -> Result<(), ApiError> {
    validate_mount(mount)?;
    if env.tx.get(&keys::mount(mount))?.is_none() {
        return Err(ApiError::NotFound(format!("no secrets engine mounted at {mount}/")));
    }
    Ok(())
}

/// Checks a secret path: 1–512 bytes of printable characters, segments separated by single
/// `/`, none empty, `.` or `..`, no leading or trailing `/`.
pub fn validate_path(path: &str) -> Result<(), ApiError> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES {
        return Err(ApiError::invalid(format!("path: 1 to {MAX_PATH_BYTES} bytes")));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid("path: control characters are not allowed"));
    }
    if path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(ApiError::invalid(
            "path: segments must be non-empty and not '.' or '..', with no leading or trailing '/'",
        ));
    }
    Ok(())
}

/// Checks a list prefix: empty, or a path followed by `/`.
fn validate_prefix(prefix: &str) -> Result<(), ApiError> {
    if prefix.is_empty() {
        return Ok(());
    }
    match prefix.strip_suffix('/') {
        Some(dir) => validate_path(dir),
        None => validate_path(prefix),
    }
}

/// Checks a secret's data: at most [`MAX_DATA_KEYS`] keys of 1–256 printable characters,
/// values nested at most [`MAX_VALUE_DEPTH`] deep, [`MAX_DATA_BYTES`] in all.
pub fn validate_data(data: &SecretData) -> Result<(), ApiError> {
    if data.0.len() > MAX_DATA_KEYS {
        return Err(ApiError::invalid(format!("a secret holds at most {MAX_DATA_KEYS} keys")));
    }
    let mut size = 2;
    for (key, value) in &data.0 {
        if key.is_empty() || key.len() > 256 || key.chars().any(|c| c.is_control()) {
            return Err(ApiError::invalid("data keys: 1 to 256 printable characters"));
        }
        if depth(value, 0) > MAX_VALUE_DEPTH {
            return Err(ApiError::invalid(format!(
                "data: key {key:?} nests deeper than {MAX_VALUE_DEPTH} levels"
            )));
        }
        size += key.len() + encoded_len(value) + 4;
        if size > MAX_DATA_BYTES {
            return Err(ApiError::invalid(format!("secret data exceeds {MAX_DATA_BYTES} bytes")));
        }
    }
    Ok(())
}

/// A value's nesting depth, counted no further than one past [`MAX_VALUE_DEPTH`].
fn depth(value: &serde_json::Value, at: usize) -> usize {
    use serde_json::Value;
    if at > MAX_VALUE_DEPTH {
        return at;
    }
    match value {
        Value::Array(items) => items.iter().map(|v| depth(v, at + 1)).max().unwrap_or(at + 1),
        Value::Object(map) => map.values().map(|v| depth(v, at + 1)).max().unwrap_or(at + 1),
        _ => at,
    }
}

/// The length of a value's compact JSON encoding (a string: its bytes; escapes aside).
fn encoded_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    match value {
        serde_json::Value::String(s) => s.len(),
        other => {
            let mut count = Count(0);
            // Writing to a counter cannot fail.
            let _ = serde_json::to_writer(&mut count, other);
            count.0
        }
    }
}

fn validate_custom(custom: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if custom.len() > MAX_CUSTOM_METADATA
        || custom
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 512 || k.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(format!(
            "custom metadata: at most {MAX_CUSTOM_METADATA} keys of 1 to 128 bytes, values up to 512 bytes"
        )));
    }
    Ok(())
}

fn api_path(mount: &str, kind: &str, path: &str) -> String {
    format!("{mount}/{kind}/{path}")
}

pub(crate) fn load_meta(env: &mut Env<'_>, mount: &str, path: &str) -> Result<Option<Metadata>, ApiError> {
    Ok(load_meta_shared(env, mount, path)?.map(|m| (*m).clone()))
}

/// A secret's metadata as the cache holds it, without a copy: for requests that only read
/// it (a read would otherwise clone every version's entry).
fn load_meta_shared(env: &mut Env<'_>, mount: &str, path: &str) -> Result<Option<Arc<Metadata>>, ApiError> {
    let cache = &env.node.caches.kv_meta;
    env.get_json_cached(&keys::kv_meta(mount, path), cache)
}

fn no_secret() -> ApiError {
    ApiError::NotFound("no secret at this path".into())
}

/// Writes a secret's metadata (and keeps it decoded for the next request that reads it).
pub(crate) fn store_meta(env: &mut Env<'_>, mount: &str, path: &str, meta: Metadata) -> Result<(), ApiError> {
    let node = env.node;
    env.put_json_cached(&keys::kv_meta(mount, path), meta, &node.caches.kv_meta)
}

pub(crate) fn require_meta(env: &mut Env<'_>, mount: &str, path: &str) -> Result<Metadata, ApiError> {
    load_meta(env, mount, path)?.ok_or_else(no_secret)
}

fn check_cas(meta: Option<&Metadata>, cas: Option<u64>, mount: &KvConfig) -> Result<(), ApiError> {
    let current = meta.map_or(0, |m| m.current_version);
    if (mount.cas_required || meta.is_some_and(|m| m.cas_required)) && cas.is_none() {
        return Err(ApiError::FailedPrecondition(
            "check-and-set is required for this secret: pass cas".into(),
        ));
    }
    match cas {
        Some(expected) if expected != current => Err(ApiError::FailedPrecondition(format!(
            "check-and-set failed: cas {expected} does not match the current version {current}"
        ))),
        _ => Ok(()),
    }
}

/// Writes a new version (inside the transaction), places it among the stages, and prunes
/// versions beyond the maximum (never a staged one). `config` is the mount's
/// ([`mount_config`]).
pub(crate) fn write_version(
    env: &mut Env<'_>,
    (mount, config): (&str, &KvConfig),
    path: &str,
    meta: Option<Metadata>,
    data: &SecretData,
    stage: NewVersionStage,
) -> Result<u64, ApiError> {
    let now = env.now_unix_ms;
    let mut meta = meta.unwrap_or(Metadata { created_unix_ms: now, ..Metadata::default() });
    let version = meta.current_version + 1;
    let delete_after = match meta.delete_version_after_secs {
        0 => config.delete_version_after_secs,
        own => own,
    };
    match stage {
        NewVersionStage::Current => {
            if let Some(old) = meta.stage(STAGE_CURRENT) {
                meta.stages.insert(STAGE_PREVIOUS.into(), old);
            }
            meta.stages.insert(STAGE_CURRENT.into(), version);
        }
        NewVersionStage::Pending => {
            meta.stages.insert(STAGE_PENDING.into(), version);
        }
    }
    meta.current_version = version;
    meta.updated_unix_ms = now;
    meta.versions.insert(
        version,
        VersionMeta {
            created_unix_ms: now,
            deletion_unix_ms: (delete_after > 0).then(|| now.saturating_add(delete_after * 1000)),
            destroyed: false,
            revoked_unix_ms: None,
            slot: None,
        },
    );
    // The new version is staged, so it is never pruned here.
    let pruned = prunable(&mut meta, config);
    // A pruned version's slot, else the lowest slot no version holds.
    let slot = match pruned.iter().find_map(|(_, m)| m.slot) {
        Some(slot) => slot,
        None => {
            let taken: BTreeSet<u32> = meta.versions.values().filter_map(|m| m.slot).collect();
            (0..=u32::MAX).find(|s| !taken.contains(s)).ok_or(ApiError::Internal)?
        }
    };
    if let Some(new) = meta.versions.get_mut(&version) {
        new.slot = Some(slot);
    }
    let key = keys::kv_slot(mount, path, slot);
    let aad = keys::kv_version(mount, path, version);
    // One pruned row takes the new version: the one already at the slot (its value alone is
    // rewritten), else the first (a row rewritten in place rather than one deleted and one
    // appended). The other pruned rows go.
    let old_keys: Vec<Vec<u8>> = pruned.iter().map(|(v, m)| m.data_key(mount, path, *v)).collect();
    let reused = old_keys.iter().position(|k| *k == key).or((!old_keys.is_empty()).then_some(0));
    for (i, old) in old_keys.iter().enumerate() {
        if Some(i) != reused && *old != key {
            env.tx.clear(old)?;
        }
    }
    match reused {
        Some(i) => env.replace_json(&old_keys[i], &key, &aad, data)?,
        None => env.put_json_as(&key, &aad, data)?,
    }
    store_meta(env, mount, path, meta)?;
    env.secret_version = Some(version);
    Ok(version)
}

/// Drops the oldest versions beyond the maximum, skipping staged ones (a rotation's
/// `previous` stays readable); stages naming a dropped version go.
fn prune(env: &mut Env<'_>, mount: &str, path: &str, meta: &mut Metadata) -> Result<(), ApiError> {
    let config = mount_config(env, mount)?;
    for (oldest, state) in prunable(meta, &config) {
        env.tx.clear(&state.data_key(mount, path, oldest))?;
    }
    Ok(())
}

/// Takes the versions [`prune`] drops out of `meta` and returns them with their state,
/// oldest first; the caller clears their rows.
fn prunable(meta: &mut Metadata, mount: &KvConfig) -> Vec<(u64, VersionMeta)> {
    let staged: BTreeSet<u64> = meta.stages.values().copied().collect();
    let mut dropped = Vec::new();
    while meta.versions.len() > meta.effective_max_versions(mount) {
        let Some(oldest) = meta.versions.keys().copied().find(|v| !staged.contains(v)) else { break };
        if let Some(state) = meta.versions.remove(&oldest) {
            dropped.push((oldest, state));
        }
    }
    dropped
}

/// Reads and decrypts a version's data: from its row, bound to its own key.
pub(crate) fn read_data(
    env: &mut Env<'_>,
    mount: &str,
    path: &str,
    version: u64,
    state: &VersionMeta,
) -> Result<Option<Zeroizing<Vec<u8>>>, ApiError> {
    env.get_sealed_as(&state.data_key(mount, path, version), &keys::kv_version(mount, path, version))
}

/// The versions a delete/undelete/destroy names: the given ones, or the current one.
fn target_versions(meta: &Metadata, versions: &[u64]) -> Result<Vec<u64>, ApiError> {
    if versions.len() > 1000 {
        return Err(ApiError::invalid("at most 1000 versions at once"));
    }
    if versions.is_empty() {
        return Ok(vec![meta.current_version]);
    }
    Ok(versions.to_vec())
}

/// What a delete, undelete or destroy does to a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VersionChange {
    Delete,
    Undelete,
    Destroy,
}

impl VersionChange {
    fn operation(self) -> Operation {
        match self {
            VersionChange::Delete => Operation::KvDelete,
            VersionChange::Undelete => Operation::KvUndelete,
            VersionChange::Destroy => Operation::KvDestroy,
        }
    }
}

/// Ciphertext read inside the transaction, decrypted after commit.
struct SealedRead {
    ciphertext: Vec<u8>,
    aad: Vec<u8>,
    version: u64,
    meta: VersionMeta,
    custom_metadata: BTreeMap<String, String>,
}

impl Node {
    /// Reads the current version, or `version`. The value is decrypted only after the
    /// request's audit event is durable.
    pub async fn kv_read(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        version: Option<u64>,
    ) -> Audited<SecretVersion> {
        self.kv_read_at(ctx, mount, path, Selector::version(version)).await
    }

    /// Reads the version a [`Selector`] names: `current` (the default), a version, or a
    /// rotation stage (`previous`, `pending`). A revoked version is refused as such.
    pub async fn kv_read_at(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        selector: Selector,
    ) -> Audited<SecretVersion> {
        let Audited { result, request_id, position } =
            self.kv_read_plain_at(ctx, mount, path, selector).await;
        Audited { result: result.and_then(PlainVersion::parse), request_id, position }
    }

    /// [`Node::kv_read_at`], with the version's data left as the JSON object it was stored as
    /// (see [`PlainVersion`]: the HTTP API copies it into the reply as it stands).
    pub async fn kv_read_plain_at(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        selector: Selector,
    ) -> Audited<PlainVersion> {
        self.read_version(ctx, Operation::KvRead, "data", mount, path, selector).await
    }

    /// A version's key structure without its values, as Vault's `<mount>/subkeys/<path>`
    /// (`read` on that path): each key of the data, nested objects followed `depth` levels
    /// (0: all), every other value `null`. Audited as `kv.subkeys`.
    pub async fn kv_subkeys(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        selector: Selector,
        depth: usize,
    ) -> Audited<(serde_json::Value, PlainVersion)> {
        let Audited { result, request_id, position } =
            self.read_version(ctx, Operation::KvSubkeys, "subkeys", mount, path, selector).await;
        let result = result.and_then(|plain| {
            let mut data: SecretData = serde_json::from_slice(&plain.json).map_err(|_| ApiError::Internal)?;
            let keys = subkeys(&mut data.0, depth);
            let plain = PlainVersion { json: Zeroizing::new(Vec::new()), ..plain };
            Ok((keys, plain))
        });
        Audited { result, request_id, position }
    }

    /// Reads a version for `<mount>/<verb>/<path>`: authorized and audited in the request's
    /// transaction, which returns the ciphertext; decrypted after the event committed.
    async fn read_version(
        self: &Arc<Self>,
        ctx: RequestContext,
        op: Operation,
        verb: &'static str,
        mount: String,
        path: String,
        selector: Selector,
    ) -> Audited<PlainVersion> {
        let audit_path = api_path(&mount, verb, &path);
        let read = self
            .execute(ctx, op, audit_path.clone(), move |env| {
                check_mount(env, &mount)?;
                validate_path(&path)?;
                env.authorize(&audit_path, &[Capability::Read])?;
                let meta = load_meta_shared(env, &mount, &path)?.ok_or_else(no_secret)?;
                let version = match &selector {
                    Selector::Current => meta.stage(STAGE_CURRENT).unwrap_or(0),
                    Selector::Version(v) => *v,
                    Selector::Stage(stage) => {
                        if ![STAGE_CURRENT, STAGE_PREVIOUS, STAGE_PENDING].contains(&stage.as_str()) {
                            return Err(ApiError::invalid("stage: current, previous or pending"));
                        }
                        meta.stage(stage)
                            .ok_or_else(|| ApiError::NotFound(format!("no version is {stage}")))?
                    }
                };
                env.secret_version = Some(version);
                let vmeta = meta
                    .versions
                    .get(&version)
                    .cloned()
                    .ok_or_else(|| ApiError::NotFound("no such version".into()))?;
                if vmeta.revoked_unix_ms.is_some() {
                    return Err(ApiError::Revoked(format!("version {version} of this secret was revoked")));
                }
                if vmeta.destroyed {
                    return Err(ApiError::NotFound("this version was destroyed".into()));
                }
                if vmeta.is_deleted(env.now_unix_ms) {
                    return Err(ApiError::NotFound("this version is deleted".into()));
                }
                let aad = keys::kv_version(&mount, &path, version);
                let ciphertext =
                    env.tx.get(&vmeta.data_key(&mount, &path, version))?.ok_or(ApiError::Internal)?;
                Ok(SealedRead {
                    ciphertext,
                    aad,
                    version,
                    meta: vmeta,
                    custom_metadata: meta.custom_metadata.clone(),
                })
            })
            .await;
        let Audited { result, request_id, position } = read;
        let result = result.and_then(|sealed| {
            Ok(PlainVersion {
                json: self.decrypt(&sealed.ciphertext, &sealed.aad)?,
                version: sealed.version,
                meta: sealed.meta,
                custom_metadata: sealed.custom_metadata,
            })
        });
        Audited { result, request_id, position }
    }

    /// Writes a new version; `cas` must equal the current version when given (0: must not
    /// exist) or when the secret requires check-and-set.
    pub async fn kv_write(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        data: SecretData,
        cas: Option<u64>,
    ) -> Audited<u64> {
        let audit_path = api_path(&mount, "data", &path);
        self.execute(ctx, Operation::KvWrite, audit_path.clone(), move |env| {
            check_mount(env, &mount)?;
            validate_path(&path)?;
            validate_data(&data)?;
            let record = env.authenticate()?;
            let meta = load_meta(env, &mount, &path)?;
            let needed = if meta.as_ref().is_some_and(|m| m.current_version > 0) {
                Capability::Update
            } else {
                Capability::Create
            };
            if !env.allowed(&record, &audit_path, &[needed])? {
                return Err(ApiError::PermissionDenied);
            }
            let config = mount_config(env, &mount)?;
            check_cas(meta.as_ref(), cas, &config)?;
            write_version(env, (&mount, &config), &path, meta, &data, NewVersionStage::Current)
        })
        .await
    }

    /// Writes a new version from the current one with `remove` removed and `set` merged in
    /// ([`merge_patch`] per key; a null removes the key).
    pub async fn kv_patch(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        set: SecretData,
        remove: Vec<String>,
        cas: Option<u64>,
    ) -> Audited<u64> {
        let audit_path = api_path(&mount, "data", &path);
        self.execute(ctx, Operation::KvPatch, audit_path.clone(), move |env| {
            check_mount(env, &mount)?;
            validate_path(&path)?;
            validate_data(&set)?;
            if set.0.is_empty() && remove.is_empty() {
                return Err(ApiError::invalid("patch: nothing to change"));
            }
            env.authorize(&audit_path, &[Capability::Patch])?;
            let meta = require_meta(env, &mount, &path)?;
            let config = mount_config(env, &mount)?;
            check_cas(Some(&meta), cas, &config)?;
            let current = meta.stage(STAGE_CURRENT).unwrap_or(0);
            let state =
                meta.versions.get(&current).ok_or_else(|| ApiError::NotFound("no current version".into()))?;
            if state.destroyed || state.is_deleted(env.now_unix_ms) || state.revoked_unix_ms.is_some() {
                return Err(ApiError::NotFound(
                    "the current version is deleted, destroyed or revoked".into(),
                ));
            }
            let plain = read_data(env, &mount, &path, current, state)?.ok_or(ApiError::Internal)?;
            let mut data: SecretData = serde_json::from_slice(&plain).map_err(|_| ApiError::Internal)?;
            for key in &remove {
                if let Some(mut gone) = data.0.remove(key) {
                    scrub(&mut gone);
                }
            }
            // Vault's PATCH is a JSON merge patch of the data: objects merge member by member,
            // a null removes (at the top, as `remove` does), anything else replaces.
            for (key, value) in &set.0 {
                let mut old = data.0.remove(key).unwrap_or(serde_json::Value::Null);
                if value.is_null() {
                    scrub(&mut old);
                } else {
                    data.0.insert(key.clone(), merge_patch(old, value.clone()));
                }
            }
            validate_data(&data)?;
            write_version(env, (&mount, &config), &path, Some(meta), &data, NewVersionStage::Current)
        })
        .await
    }

    /// Lists the names directly under `prefix` (empty, or ending in `/`); folders end in `/`.
    pub async fn kv_list(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        prefix: String,
    ) -> Audited<Vec<String>> {
        let audit_path = api_path(&mount, "metadata", &prefix);
        self.execute(ctx, Operation::KvList, audit_path.clone(), move |env| {
            check_mount(env, &mount)?;
            validate_prefix(&prefix)?;
            let prefix = if prefix.is_empty() || prefix.ends_with('/') {
                prefix.clone()
            } else {
                format!("{prefix}/")
            };
            env.authorize(&audit_path, &[Capability::List])?;
            let begin = keys::kv_meta_prefix(&mount, &prefix);
            let end = arca_store::prefix_end(&begin).ok_or(ApiError::Internal)?;
            let rows = env.tx.get_range(&begin, &end, arca_store::RangeOptions::limit(MAX_LIST_KEYS))?;
            let mut names = std::collections::BTreeSet::new();
            for kv in rows {
                let tuple = arca_store::tuple::unpack(&kv.key).map_err(|_| ApiError::Internal)?;
                let Some(full) = tuple.last().and_then(|e| e.as_str()) else { continue };
                let Some(rest) = full.strip_prefix(prefix.as_str()) else { continue };
                let name = match rest.find('/') {
                    Some(i) => &rest[..=i],
                    None => rest,
                };
                names.insert(name.to_owned());
            }
            Ok(names.into_iter().collect())
        })
        .await
    }

    /// Soft-deletes versions (default: the current one); undelete restores them.
    pub async fn kv_delete(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        versions: Vec<u64>,
    ) -> Audited<Vec<u64>> {
        let (audit_path, cap) = if versions.is_empty() {
            (api_path(&mount, "data", &path), Capability::Delete)
        } else {
            (api_path(&mount, "delete", &path), Capability::Update)
        };
        self.kv_change_versions(ctx, VersionChange::Delete, audit_path, cap, mount, path, versions).await
    }

    pub async fn kv_undelete(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        versions: Vec<u64>,
    ) -> Audited<Vec<u64>> {
        let audit_path = api_path(&mount, "undelete", &path);
        self.kv_change_versions(
            ctx,
            VersionChange::Undelete,
            audit_path,
            Capability::Update,
            mount,
            path,
            versions,
        )
        .await
    }

    /// Destroys versions for good: their data is removed from the store.
    pub async fn kv_destroy(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        versions: Vec<u64>,
    ) -> Audited<Vec<u64>> {
        let audit_path = api_path(&mount, "destroy", &path);
        self.kv_change_versions(
            ctx,
            VersionChange::Destroy,
            audit_path,
            Capability::Update,
            mount,
            path,
            versions,
        )
        .await
    }

    /// Applies `change` to each named version it applies to; returns the versions changed.
    #[allow(clippy::too_many_arguments)]
    async fn kv_change_versions(
        self: &Arc<Self>,
        ctx: RequestContext,
        change: VersionChange,
        audit_path: String,
        cap: Capability,
        mount: String,
        path: String,
        versions: Vec<u64>,
    ) -> Audited<Vec<u64>> {
        self.execute(ctx, change.operation(), audit_path.clone(), move |env| {
            check_mount(env, &mount)?;
            validate_path(&path)?;
            if versions.is_empty() && change != VersionChange::Delete {
                return Err(ApiError::invalid(format!("{}: name the versions", change.operation().name())));
            }
            env.authorize(&audit_path, &[cap])?;
            let mut meta = require_meta(env, &mount, &path)?;
            let now = env.now_unix_ms;
            let mut changed = Vec::new();
            for version in target_versions(&meta, &versions)? {
                let Some(v) = meta.versions.get_mut(&version) else { continue };
                match change {
                    VersionChange::Delete if !v.destroyed && !v.is_deleted(now) => {
                        v.deletion_unix_ms = Some(now)
                    }
                    VersionChange::Undelete if !v.destroyed && v.deletion_unix_ms.is_some() => {
                        v.deletion_unix_ms = None
                    }
                    VersionChange::Destroy if !v.destroyed => {
                        v.destroyed = true;
                        env.tx.clear(&v.data_key(&mount, &path, version))?;
                    }
                    _ => continue,
                }
                changed.push(version);
            }
            meta.updated_unix_ms = now;
            store_meta(env, &mount, &path, meta)?;
            env.secret_version = changed.first().copied();
            Ok(changed)
        })
        .await
    }

    pub async fn kv_read_metadata(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
    ) -> Audited<Metadata> {
        let audit_path = api_path(&mount, "metadata", &path);
        self.execute(ctx, Operation::KvReadMetadata, audit_path.clone(), move |env| {
            check_mount(env, &mount)?;
            validate_path(&path)?;
            env.authorize(&audit_path, &[Capability::Read])?;
            require_meta(env, &mount, &path)
        })
        .await
    }

    pub async fn kv_write_metadata(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        update: MetadataUpdate,
    ) -> Audited<Metadata> {
        let audit_path = api_path(&mount, "metadata", &path);
        self.execute(ctx, Operation::KvWriteMetadata, audit_path.clone(), move |env| {
            check_mount(env, &mount)?;
            validate_path(&path)?;
            if let Some(custom) = &update.custom_metadata {
                validate_custom(custom)?;
            }
            if update.max_versions.is_some_and(|m| m > 1000) {
                return Err(ApiError::invalid("max_versions: at most 1000"));
            }
            if update.delete_version_after_secs.is_some_and(|s| s > MAX_DELETE_VERSION_AFTER_SECS) {
                return Err(ApiError::invalid("delete_version_after: at most 100 years"));
            }
            env.authorize(&audit_path, &[Capability::Create, Capability::Update])?;
            let now = env.now_unix_ms;
            let mut meta = load_meta(env, &mount, &path)?
                .unwrap_or(Metadata { created_unix_ms: now, ..Metadata::default() });
            if let Some(max) = update.max_versions {
                meta.max_versions = max;
            }
            if let Some(cas) = update.cas_required {
                meta.cas_required = cas;
            }
            if let Some(custom) = &update.custom_metadata {
                meta.custom_metadata = custom.clone();
            }
            if let Some(after) = update.delete_version_after_secs {
                meta.delete_version_after_secs = after;
            }
            prune(env, &mount, &path, &mut meta)?;
            meta.updated_unix_ms = now;
            store_meta(env, &mount, &path, meta.clone())?;
            Ok(meta)
        })
        .await
    }

    /// A mount's settings (`read` on `<mount>/config`).
    pub async fn kv_config_read(self: &Arc<Self>, ctx: RequestContext, mount: String) -> Audited<KvConfig> {
        let path = format!("{mount}/config");
        self.execute(ctx, Operation::MountRead, path.clone(), move |env| {
            check_mount(env, &mount)?;
            env.authorize(&path, &[Capability::Read])?;
            mount_config(env, &mount)
        })
        .await
    }

    /// Changes a mount's settings (`create` or `update` on `<mount>/config`); they apply to
    /// the writes that follow (a lower `max_versions` prunes at a secret's next write).
    pub async fn kv_config_write(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        update: KvConfigUpdate,
    ) -> Audited<KvConfig> {
        let path = format!("{mount}/config");
        self.execute(ctx, Operation::MountWrite, path.clone(), move |env| {
            check_mount(env, &mount)?;
            if update.max_versions.is_some_and(|m| m > 1000) {
                return Err(ApiError::invalid("max_versions: at most 1000"));
            }
            if update.delete_version_after_secs.is_some_and(|s| s > MAX_DELETE_VERSION_AFTER_SECS) {
                return Err(ApiError::invalid("delete_version_after: at most 100 years"));
            }
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            let key = keys::mount(&mount);
            let raw = env.tx.get(&key)?.ok_or(ApiError::Internal)?;
            let mut stored: Mount = serde_json::from_slice(&raw).map_err(|_| ApiError::Internal)?;
            if let Some(max) = update.max_versions {
                stored.config.max_versions = max;
            }
            if let Some(cas) = update.cas_required {
                stored.config.cas_required = cas;
            }
            if let Some(after) = update.delete_version_after_secs {
                stored.config.delete_version_after_secs = after;
            }
            env.tx.set(&key, &serde_json::to_vec(&stored).map_err(|_| ApiError::Internal)?)?;
            Ok(stored.config)
        })
        .await
    }

    /// Deletes a secret entirely: metadata and every version.
    pub async fn kv_delete_metadata(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
    ) -> Audited<()> {
        let audit_path = api_path(&mount, "metadata", &path);
        self.execute(ctx, Operation::KvDeleteMetadata, audit_path.clone(), move |env| {
            check_mount(env, &mount)?;
            validate_path(&path)?;
            env.authorize(&audit_path, &[Capability::Delete])?;
            let meta = require_meta(env, &mount, &path)?;
            for (version, state) in &meta.versions {
                env.tx.clear(&state.data_key(&mount, &path, *version))?;
            }
            env.tx.clear(&keys::kv_meta(&mount, &path))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // RFC 7396, appendix A: target, patch, result.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": "b", "b": "c"}), json!({"a": null}), json!({"b": "c"})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (json!({"a": {"b": "c"}}), json!({"a": {"b": "d", "c": null}}), json!({"a": {"b": "d"}})),
            (json!({"a": [{"b": "c"}]}), json!({"a": [1]}), json!({"a": [1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!([1, 2]), json!({"a": "b", "c": null}), json!({"a": "b"})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
        ];
        for (target, patch, result) in cases {
            assert_eq!(merge_patch(target.clone(), patch.clone()), result, "{target} + {patch}");
        }
    }

    #[test]
    fn data_of_any_json_type_is_checked_for_depth_and_size() {
        let data: SecretData = [
            ("s", json!("x")),
            ("n", json!(5432)),
            ("f", json!(1.5)),
            ("b", json!(true)),
            ("z", Value::Null),
            ("a", json!(["a", {"b": [1, 2]}])),
        ]
        .into_iter()
        .collect();
        validate_data(&data).unwrap();
        assert_eq!(data.text("s"), Some("x"));
        assert_eq!(data.text("n"), None, "only strings are text");

        let mut deep = json!("leaf");
        for _ in 0..MAX_VALUE_DEPTH {
            deep = json!([deep]);
        }
        validate_data(&[("k", deep.clone())].into_iter().collect()).unwrap();
        let err = validate_data(&[("k", json!({ "x": deep }))].into_iter().collect()).unwrap_err();
        assert!(err.to_string().contains("deeper than 32"), "{err}");

        // Size counts the encoding of values that are not strings.
        let big = json!(vec![123_456_789; MAX_DATA_BYTES / 10 + 1]);
        let err = validate_data(&[("k", big)].into_iter().collect()).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        let fits = json!(vec![1; MAX_DATA_BYTES / 2 - 16]);
        validate_data(&[("k", fits)].into_iter().collect()).unwrap();
    }

    #[test]
    fn mount_names_are_segments_without_kv_words() {
        for good in ["secret", "team", "team/kv", "a/b/c.d", "x-1/y_2", &["s"; 64].join("/")] {
            validate_mount(good).unwrap();
        }
        let long_segment = "a".repeat(65);
        let too_long = ["abcdefghijklmnop"; 8].join("/");
        for bad in [
            "",
            "/",
            "team/",
            "/team",
            "team//kv",
            "Team",
            "team/kv space",
            "./x",
            "x/..",
            "sys",
            "sys/x",
            "auth/kv",
            "team/data",
            "data",
            "x/metadata/y",
            "team/destroy",
            &long_segment,
            &too_long,
        ] {
            assert!(validate_mount(bad).is_err(), "{bad:?}");
        }
        assert!(validate_mount("x/sys").is_ok(), "only the first segment is reserved");
    }

    #[test]
    fn scrub_wipes_every_string_in_place() {
        let mut value = json!({"a": ["secret", {"b": "also"}], "n": 1});
        scrub(&mut value);
        assert_eq!(value, json!({"a": ["", {"b": ""}], "n": 1}), "zeroized, then emptied");
    }
}
