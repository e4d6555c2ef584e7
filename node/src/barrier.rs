//! The cryptographic barrier: everything the node stores, except the audit queue, passes
//! through here and is stored as AES-256-GCM ciphertext.
//!
//! Key hierarchy: data is encrypted under a **keyring** of data keys (one per term; rotation
//! adds a term, old terms stay readable). The keyring is encrypted under the **root key**; the
//! root key under the **unseal key**, which exists only as Shamir shares (k of n) held by
//! operators. A sealed node holds no key and decrypts nothing.
//!
//! Ciphertext layout (v1): `0x01 ‖ term (u32 BE) ‖ nonce (12) ‖ AES-GCM(ciphertext ‖ tag)`,
//! with the caller's AAD — the store key the ciphertext is written at — so a ciphertext moved
//! to another path or version no longer decrypts.
//!
//! Invariants: key material is zeroized when dropped; no key, plaintext or share is ever
//! logged or formatted by `Debug`; a reconstructed unseal key is verified (the root key's
//! AES-GCM tag) before it is trusted, because Shamir combination of wrong shares yields wrong
//! bytes without error.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::RwLock;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

const FORMAT_V1: u8 = 1;
const HEADER_LEN: usize = 1 + 4 + 12;
const ROOT_KEY_AAD: &[u8] = b"arca/v1/root-key";
const KEYRING_AAD: &[u8] = b"arca/v1/keyring";

/// Most key shares an unseal key may be split into.
pub const MAX_SHARES: u8 = 32;

/// Errors of the barrier, in its own words. None carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("the node is sealed: unseal it with `arca operator unseal`")]
    Sealed,
    #[error("the node is already unsealed")]
    AlreadyUnsealed,
    #[error("ciphertext failed authentication: wrong key, or moved to another path or version")]
    Authentication,
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("ciphertext uses keyring term {0}, which this keyring does not hold")]
    UnknownTerm(u32),
    #[error("invalid key share: {0}")]
    InvalidShare(&'static str),
    #[error("the key shares do not reconstruct the unseal key; unseal progress was reset")]
    WrongShares,
    #[error("invalid seal parameters: {0}")]
    InvalidParameters(&'static str),
    #[error("stored seal data is malformed")]
    CorruptSealData,
}

/// A 256-bit key, zeroized on drop, never printed.
#[derive(Clone, Zeroize)]
#[zeroize(drop)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        SecretKey(key)
    }

    fn from_slice(bytes: &[u8]) -> Option<Self> {
        let key: [u8; 32] = bytes.try_into().ok()?;
        Some(SecretKey(key))
    }

    fn cipher(&self) -> Aes256Gcm {
        // A 32-byte key is always a valid AES-256 key.
        Aes256Gcm::new_from_slice(&self.0).expect("32-byte key")
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

fn seal_bytes(key: &SecretKey, term: u32, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::fill(&mut nonce);
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.push(FORMAT_V1);
    header.extend_from_slice(&term.to_be_bytes());
    header.extend_from_slice(&nonce);
    // Encryption with a valid key cannot fail for inputs under AES-GCM's 64 GiB bound; ours
    // are bounded by the store's 100 kB value limit.
    let body = key
        .cipher()
        .encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad })
        .expect("AES-GCM encryption of a bounded message");
    header.extend_from_slice(&body);
    header
}

fn parse_header(ciphertext: &[u8]) -> Result<(u32, [u8; 12], &[u8]), BarrierError> {
    if ciphertext.len() < HEADER_LEN + 16 || ciphertext[0] != FORMAT_V1 {
        return Err(BarrierError::Malformed);
    }
    let term = u32::from_be_bytes([ciphertext[1], ciphertext[2], ciphertext[3], ciphertext[4]]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&ciphertext[5..HEADER_LEN]);
    Ok((term, nonce, &ciphertext[HEADER_LEN..]))
}

fn open_bytes(
    key: &SecretKey,
    nonce: [u8; 12],
    body: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
    key.cipher()
        .decrypt(&Nonce::from(nonce), Payload { msg: body, aad })
        .map(Zeroizing::new)
        .map_err(|_| BarrierError::Authentication)
}

/// The data keys, by term. The highest term encrypts; every term decrypts.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, SecretKey>,
    created_unix_ms: BTreeMap<u32, u64>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("terms", &self.keys.keys().collect::<Vec<_>>()).finish()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredKeyring {
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    term: u32,
    key: String,
    created_unix_ms: u64,
}

impl Keyring {
    fn new(now_unix_ms: u64) -> Self {
        let mut ring = Keyring { keys: BTreeMap::new(), created_unix_ms: BTreeMap::new() };
        ring.keys.insert(1, SecretKey::generate());
        ring.created_unix_ms.insert(1, now_unix_ms);
        ring
    }

    pub fn active_term(&self) -> u32 {
        // A keyring always holds at least term 1.
        *self.keys.keys().next_back().expect("keyring is never empty")
    }

    pub fn terms(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.created_unix_ms.iter().map(|(t, c)| (*t, *c))
    }

    /// Adds a new term, which encrypts from now on.
    pub fn rotate(&mut self, now_unix_ms: u64) -> u32 {
        let term = self.active_term() + 1;
        self.keys.insert(term, SecretKey::generate());
        self.created_unix_ms.insert(term, now_unix_ms);
        term
    }

    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let term = self.active_term();
        seal_bytes(&self.keys[&term], term, plaintext, aad)
    }

    pub fn decrypt(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
        let (term, nonce, body) = parse_header(ciphertext)?;
        let key = self.keys.get(&term).ok_or(BarrierError::UnknownTerm(term))?;
        open_bytes(key, nonce, body, aad)
    }

    /// The keyring encrypted under the root key, for the store.
    pub fn wrap(&self, root: &SecretKey) -> Vec<u8> {
        let stored = StoredKeyring {
            keys: self
                .keys
                .iter()
                .map(|(term, key)| StoredKey {
                    term: *term,
                    key: B64.encode(key.0),
                    created_unix_ms: self.created_unix_ms.get(term).copied().unwrap_or(0),
                })
                .collect(),
        };
        let json = Zeroizing::new(serde_json::to_vec(&stored).expect("keyring serializes"));
        for mut key in stored.keys {
            key.key.zeroize();
        }
        seal_bytes(root, 0, &json, KEYRING_AAD)
    }

    pub fn unwrap(root: &SecretKey, wrapped: &[u8]) -> Result<Self, BarrierError> {
        let (_, nonce, body) = parse_header(wrapped)?;
        let json = open_bytes(root, nonce, body, KEYRING_AAD)?;
        let stored: StoredKeyring =
            serde_json::from_slice(&json).map_err(|_| BarrierError::CorruptSealData)?;
        let mut ring = Keyring { keys: BTreeMap::new(), created_unix_ms: BTreeMap::new() };
        for mut entry in stored.keys {
            let raw = Zeroizing::new(B64.decode(&entry.key).map_err(|_| BarrierError::CorruptSealData)?);
            entry.key.zeroize();
            let key = SecretKey::from_slice(&raw).ok_or(BarrierError::CorruptSealData)?;
            ring.keys.insert(entry.term, key);
            ring.created_unix_ms.insert(entry.term, entry.created_unix_ms);
        }
        if ring.keys.is_empty() {
            return Err(BarrierError::CorruptSealData);
        }
        Ok(ring)
    }
}

/// What the store keeps about the seal (at `sys/seal`): public parameters and the root key
/// encrypted under the unseal key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealConfig {
    pub shares: u8,
    pub threshold: u8,
    /// The root key, AES-GCM under the unseal key (base64).
    pub sealed_root_key: String,
    /// With an HSM seal: the unseal key encrypted by a key that never leaves the HSM. The
    /// Shamir shares then serve as recovery keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm: Option<HsmWrapped>,
}

/// The unseal key as an HSM encrypted it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HsmWrapped {
    /// The HSM key's label.
    pub key_label: String,
    /// `iv (12) ‖ AES-GCM(unseal key ‖ tag)` from the HSM (base64).
    pub wrapped_unseal_key: String,
}

impl SealConfig {
    /// `"pkcs11"` or `"shamir"`.
    pub fn kind(&self) -> &'static str {
        if self.hsm.is_some() { "pkcs11" } else { "shamir" }
    }
}

/// The outcome of `init`: what to store, and what to hand the operators (once).
pub struct Initialized {
    pub seal: SealConfig,
    pub wrapped_keyring: Vec<u8>,
    /// Hex-encoded key shares; shown once, never stored.
    pub shares: Vec<Zeroizing<String>>,
    pub unseal: SecretKey,
    pub root: SecretKey,
    pub keyring: Keyring,
}

impl fmt::Debug for Initialized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initialized").field("seal", &self.seal).finish_non_exhaustive()
    }
}

/// Generates the key hierarchy and splits the unseal key into `shares` shares, any
/// `threshold` of which reconstruct it.
pub fn initialize(shares: u8, threshold: u8, now_unix_ms: u64) -> Result<Initialized, BarrierError> {
    if threshold == 0 || shares == 0 {
        return Err(BarrierError::InvalidParameters("key shares and threshold must be at least 1"));
    }
    if threshold > shares {
        return Err(BarrierError::InvalidParameters("the threshold cannot exceed the number of shares"));
    }
    if shares > MAX_SHARES {
        return Err(BarrierError::InvalidParameters("at most 32 key shares"));
    }
    if threshold == 1 && shares > 1 {
        return Err(BarrierError::InvalidParameters("a threshold of 1 needs exactly 1 share"));
    }
    let unseal = SecretKey::generate();
    let root = SecretKey::generate();
    let keyring = Keyring::new(now_unix_ms);
    let sealed_root_key = B64.encode(seal_bytes(&unseal, 0, &root.0, ROOT_KEY_AAD));
    let split: Vec<Vec<u8>> = if shares == 1 {
        vec![unseal.0.to_vec()]
    } else {
        vsss_rs::Gf256::split_bytes(threshold.into(), shares.into(), unseal.0, rand::rng())
            .map_err(|_| BarrierError::InvalidParameters("share generation failed"))?
    };
    let shares_hex = split
        .into_iter()
        .map(|mut share| {
            let hex = Zeroizing::new(hex::encode(&share));
            share.zeroize();
            hex
        })
        .collect();
    Ok(Initialized {
        seal: SealConfig { shares, threshold, sealed_root_key, hsm: None },
        wrapped_keyring: keyring.wrap(&root),
        shares: shares_hex,
        unseal,
        root,
        keyring,
    })
}

/// Reconstructs the unseal key from `threshold` shares and the root key under it (which
/// verifies it).
pub fn recover_root(
    seal: &SealConfig,
    shares: &[Zeroizing<Vec<u8>>],
) -> Result<(SecretKey, SecretKey), BarrierError> {
    let unseal = if seal.shares == 1 {
        SecretKey::from_slice(&shares[0]).ok_or(BarrierError::InvalidShare("wrong length"))?
    } else {
        let owned: Vec<Vec<u8>> = shares.iter().map(|s| s.to_vec()).collect();
        let combined = vsss_rs::Gf256::combine_bytes(&owned);
        for mut share in owned {
            share.zeroize();
        }
        let combined = Zeroizing::new(combined.map_err(|_| BarrierError::WrongShares)?);
        SecretKey::from_slice(&combined).ok_or(BarrierError::WrongShares)?
    };
    // The AES-GCM tag is the check value: wrong shares reconstruct a wrong key, which fails here.
    let root = open_root(seal, &unseal).map_err(|_| BarrierError::WrongShares)?;
    Ok((unseal, root))
}

/// Opens the root key with an unseal key (from shares, or unwrapped by the HSM).
pub fn open_root(seal: &SealConfig, unseal: &SecretKey) -> Result<SecretKey, BarrierError> {
    let sealed = B64.decode(&seal.sealed_root_key).map_err(|_| BarrierError::CorruptSealData)?;
    let (_, nonce, body) = parse_header(&sealed)?;
    let root = open_bytes(unseal, nonce, body, ROOT_KEY_AAD)?;
    SecretKey::from_slice(&root).ok_or(BarrierError::CorruptSealData)
}

/// An unseal key from bytes an HSM returned (checked by [`open_root`] before use).
pub fn unseal_key_from_bytes(bytes: &[u8]) -> Result<SecretKey, BarrierError> {
    SecretKey::from_slice(bytes).ok_or(BarrierError::CorruptSealData)
}

/// Parses one operator-supplied share (hex).
pub fn parse_share(seal: &SealConfig, hex_share: &str) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
    let bytes =
        Zeroizing::new(hex::decode(hex_share.trim()).map_err(|_| BarrierError::InvalidShare("not hex"))?);
    let expected = if seal.shares == 1 { 32 } else { 33 };
    if bytes.len() != expected {
        return Err(BarrierError::InvalidShare("wrong length"));
    }
    Ok(bytes)
}

/// The node's seal state: either sealed (collecting shares) or unsealed (holding the root key
/// and the keyring).
#[derive(Default)]
pub struct Barrier {
    state: RwLock<State>,
}

#[derive(Default)]
enum State {
    #[default]
    Sealed,
    Collecting(Vec<Zeroizing<Vec<u8>>>),
    Unsealed {
        /// Kept while unsealed so the seal can be migrated (Shamir ↔ HSM) without new shares.
        unseal: SecretKey,
        root: SecretKey,
        keyring: Keyring,
    },
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier").field("sealed", &self.is_sealed()).finish()
    }
}

/// Where an unseal attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsealProgress {
    pub sealed: bool,
    pub progress: u8,
    pub threshold: u8,
}

impl Barrier {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poison| poison.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn is_sealed(&self) -> bool {
        !matches!(*self.read(), State::Unsealed { .. })
    }

    /// How many shares have been given so far.
    pub fn progress(&self) -> u8 {
        match &*self.read() {
            State::Collecting(shares) => shares.len() as u8,
            _ => 0,
        }
    }

    /// Unseals directly with known keys (init, the HSM seal, and tests).
    pub fn install(&self, unseal: SecretKey, root: SecretKey, keyring: Keyring) {
        *self.write() = State::Unsealed { unseal, root, keyring };
    }

    /// The unseal key, while unsealed (for seal migration).
    pub fn unseal_key(&self) -> Result<SecretKey, BarrierError> {
        match &*self.read() {
            State::Unsealed { unseal, .. } => Ok(unseal.clone()),
            _ => Err(BarrierError::Sealed),
        }
    }

    /// Adds one share; at the threshold, reconstructs and verifies the root key, then unwraps
    /// the keyring. Wrong shares reset the progress.
    pub fn submit_share(
        &self,
        seal: &SealConfig,
        wrapped_keyring: &[u8],
        share: &str,
    ) -> Result<UnsealProgress, BarrierError> {
        let share = parse_share(seal, share)?;
        let mut state = self.write();
        let mut shares = match std::mem::take(&mut *state) {
            unsealed @ State::Unsealed { .. } => {
                *state = unsealed;
                return Err(BarrierError::AlreadyUnsealed);
            }
            State::Sealed => Vec::new(),
            State::Collecting(shares) => shares,
        };
        if seal.shares > 1 && shares.iter().any(|s| s[0] == share[0]) {
            // Giving the same share again changes nothing (requests may be retried).
            let progress = shares.len() as u8;
            *state = State::Collecting(shares);
            return Ok(UnsealProgress { sealed: true, progress, threshold: seal.threshold });
        }
        shares.push(share);
        if shares.len() < usize::from(seal.threshold) {
            let progress = shares.len() as u8;
            *state = State::Collecting(shares);
            return Ok(UnsealProgress { sealed: true, progress, threshold: seal.threshold });
        }
        // On any failure below, the state stays Sealed: progress resets.
        let (unseal, root) = recover_root(seal, &shares)?;
        let keyring = Keyring::unwrap(&root, wrapped_keyring)?;
        *state = State::Unsealed { unseal, root, keyring };
        Ok(UnsealProgress { sealed: false, progress: 0, threshold: seal.threshold })
    }

    /// Forgets every key.
    pub fn seal(&self) {
        *self.write() = State::Sealed;
    }

    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, BarrierError> {
        match &*self.read() {
            State::Unsealed { keyring, .. } => Ok(keyring.encrypt(plaintext, aad)),
            _ => Err(BarrierError::Sealed),
        }
    }

    pub fn decrypt(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
        match &*self.read() {
            State::Unsealed { keyring, .. } => keyring.decrypt(ciphertext, aad),
            _ => Err(BarrierError::Sealed),
        }
    }

    /// Replaces the keyring with the stored one (after another node rotated it).
    pub fn reload_keyring(&self, wrapped: &[u8]) -> Result<(), BarrierError> {
        let mut state = self.write();
        let State::Unsealed { root, keyring, .. } = &mut *state else {
            return Err(BarrierError::Sealed);
        };
        *keyring = Keyring::unwrap(root, wrapped)?;
        Ok(())
    }

    /// A rotated keyring, wrapped for the store; installed here once the caller committed it.
    pub fn rotated(&self, now_unix_ms: u64) -> Result<(Keyring, Vec<u8>), BarrierError> {
        let state = self.read();
        let State::Unsealed { root, keyring, .. } = &*state else {
            return Err(BarrierError::Sealed);
        };
        let mut next = keyring.clone();
        next.rotate(now_unix_ms);
        let wrapped = next.wrap(root);
        Ok((next, wrapped))
    }

    pub fn install_keyring(&self, next: Keyring) -> Result<(), BarrierError> {
        let mut state = self.write();
        let State::Unsealed { keyring, .. } = &mut *state else {
            return Err(BarrierError::Sealed);
        };
        *keyring = next;
        Ok(())
    }

    pub fn active_term(&self) -> Option<u32> {
        match &*self.read() {
            State::Unsealed { keyring, .. } => Some(keyring.active_term()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsealed() -> Barrier {
        let init = initialize(1, 1, 0).unwrap();
        let barrier = Barrier::default();
        barrier.install(init.unseal, init.root, init.keyring);
        barrier
    }

    #[test]
    fn ciphertext_is_bound_to_its_aad() {
        let barrier = unsealed();
        let ct = barrier.encrypt(b"hunter2", b"kv/secret/a/1").unwrap();
        assert_eq!(&*barrier.decrypt(&ct, b"kv/secret/a/1").unwrap(), b"hunter2");
        assert!(matches!(barrier.decrypt(&ct, b"kv/secret/a/2"), Err(BarrierError::Authentication)));
        assert!(matches!(barrier.decrypt(&ct, b"kv/secret/b/1"), Err(BarrierError::Authentication)));
        let mut flipped = ct.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(barrier.decrypt(&flipped, b"kv/secret/a/1"), Err(BarrierError::Authentication)));
        assert!(!ct.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn a_sealed_barrier_decrypts_nothing() {
        let barrier = unsealed();
        let ct = barrier.encrypt(b"v", b"aad").unwrap();
        barrier.seal();
        assert!(matches!(barrier.decrypt(&ct, b"aad"), Err(BarrierError::Sealed)));
        assert!(matches!(barrier.encrypt(b"v", b"aad"), Err(BarrierError::Sealed)));
    }

    #[test]
    fn rotation_keeps_old_terms_readable() {
        let barrier = unsealed();
        let old = barrier.encrypt(b"old", b"a").unwrap();
        let (next, _) = barrier.rotated(1).unwrap();
        barrier.install_keyring(next).unwrap();
        assert_eq!(barrier.active_term(), Some(2));
        let new = barrier.encrypt(b"new", b"a").unwrap();
        assert_eq!(u32::from_be_bytes(new[1..5].try_into().unwrap()), 2);
        assert_eq!(&*barrier.decrypt(&old, b"a").unwrap(), b"old");
        assert_eq!(&*barrier.decrypt(&new, b"a").unwrap(), b"new");
    }

    #[test]
    fn any_threshold_of_shares_unseals_and_fewer_do_not() {
        let init = initialize(5, 3, 0).unwrap();
        let ct = init.keyring.encrypt(b"secret", b"p");
        for combo in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let barrier = Barrier::default();
            for (i, &idx) in combo.iter().enumerate() {
                let progress =
                    barrier.submit_share(&init.seal, &init.wrapped_keyring, &init.shares[idx]).unwrap();
                assert_eq!(progress.sealed, i < 2);
            }
            assert_eq!(&*barrier.decrypt(&ct, b"p").unwrap(), b"secret");
        }
        let barrier = Barrier::default();
        barrier.submit_share(&init.seal, &init.wrapped_keyring, &init.shares[0]).unwrap();
        barrier.submit_share(&init.seal, &init.wrapped_keyring, &init.shares[1]).unwrap();
        assert!(barrier.is_sealed());
    }

    #[test]
    fn shares_of_another_seal_are_refused_and_reset_progress() {
        let ours = initialize(3, 2, 0).unwrap();
        let theirs = initialize(3, 2, 0).unwrap();
        let barrier = Barrier::default();
        barrier.submit_share(&ours.seal, &ours.wrapped_keyring, &ours.shares[0]).unwrap();
        let err = barrier.submit_share(&ours.seal, &ours.wrapped_keyring, &theirs.shares[1]).unwrap_err();
        assert!(matches!(err, BarrierError::WrongShares), "{err:?}");
        assert!(barrier.is_sealed());
        assert_eq!(barrier.progress(), 0);
    }

    #[test]
    fn bad_parameters_and_shares_are_refused() {
        assert!(initialize(2, 3, 0).is_err());
        assert!(initialize(0, 0, 0).is_err());
        assert!(initialize(33, 2, 0).is_err());
        let init = initialize(3, 2, 0).unwrap();
        let barrier = Barrier::default();
        assert!(matches!(
            barrier.submit_share(&init.seal, &init.wrapped_keyring, "zz"),
            Err(BarrierError::InvalidShare(_))
        ));
        assert!(matches!(
            barrier.submit_share(&init.seal, &init.wrapped_keyring, "abcd"),
            Err(BarrierError::InvalidShare(_))
        ));
    }

    #[test]
    fn debug_never_shows_keys() {
        let init = initialize(1, 1, 0).unwrap();
        let shown = format!("{:?} {:?} {:?}", init.root, init.keyring, init);
        assert!(!shown.contains(&hex::encode(init.root.expose())));
        assert!(!shown.contains(init.shares[0].as_str()));
    }
}
