//! C2SP signed notes with Ed25519: key ids, verifier keys (`vkey`), signer keys, signing
//! and verification.
//!
//! A note is UTF-8 text ending in a newline, a blank line, then signature lines
//! `— <key name> <base64(key id ‖ signature)>`. An Ed25519 key's id is the first four bytes
//! of `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)`. Verifier keys are written
//! `<name>+<key id, 8 hex digits>+<base64(0x01 ‖ public key)>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

const ALG_ED25519: u8 = 0x01;
const SIG_PREFIX: &str = "\u{2014} ";
/// Most signature lines a note may carry.
pub const MAX_SIGNATURES: usize = 100;

/// Why a key or a note was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    #[error("malformed note: {0}")]
    MalformedNote(&'static str),
    #[error("the note carries no valid signature from key {0}")]
    NotSigned(String),
    #[error("a signature from key {0} does not verify: the note was altered or signed by another key")]
    BadSignature(String),
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(|c: char| c.is_whitespace() || c == '+')
}

fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public);
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A key that verifies signatures of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: [u8; 4],
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses a `vkey` string.
    pub fn parse(vkey: &str) -> Result<Self, NoteError> {
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::MalformedKey("expected name+id+key"));
        };
        if !valid_name(name) {
            return Err(NoteError::MalformedKey("invalid key name"));
        }
        let id = parse_id(id_hex)?;
        let raw = B64.decode(key_b64).map_err(|_| NoteError::MalformedKey("key is not base64"))?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(NoteError::MalformedKey("not an Ed25519 key"));
        }
        let public: [u8; 32] = raw[1..].try_into().map_err(|_| NoteError::MalformedKey("key length"))?;
        if key_id(name, &public) != id {
            return Err(NoteError::MalformedKey("key id does not match the key"));
        }
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| NoteError::MalformedKey("invalid Ed25519 point"))?;
        if key.is_weak() {
            return Err(NoteError::MalformedKey("weak Ed25519 key"));
        }
        Ok(NoteVerifier { name: name.to_owned(), id, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `vkey` string.
    pub fn vkey(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{}+{}", self.name, hex4(&self.id), B64.encode(raw))
    }
}

fn parse_id(id_hex: &str) -> Result<[u8; 4], NoteError> {
    if id_hex.len() != 8 || !id_hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(NoteError::MalformedKey("key id must be 8 lowercase hex digits"));
    }
    let mut id = [0u8; 4];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&id_hex[2 * i..2 * i + 2], 16)
            .map_err(|_| NoteError::MalformedKey("key id"))?;
    }
    Ok(id)
}

fn hex4(id: &[u8; 4]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key that signs notes under one name. Never printed.
pub struct NoteSigner {
    name: String,
    id: [u8; 4],
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner").field("name", &self.name).field("key", &"<redacted>").finish()
    }
}

impl NoteSigner {
    /// A signer from a 32-byte Ed25519 seed (the caller draws it from a CSPRNG).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::MalformedKey("invalid key name"));
        }
        let key = SigningKey::from_bytes(seed);
        let id = key_id(name, key.verifying_key().as_bytes());
        Ok(NoteSigner { name: name.to_owned(), id, key })
    }

    /// Parses a `PRIVATE+KEY+<name>+<id>+<base64(0x01 ‖ seed)>` string.
    pub fn parse(skey: &str) -> Result<Self, NoteError> {
        let rest =
            skey.strip_prefix("PRIVATE+KEY+").ok_or(NoteError::MalformedKey("expected PRIVATE+KEY+"))?;
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::MalformedKey("expected name+id+key"));
        };
        let id = parse_id(id_hex)?;
        let raw = zeroize::Zeroizing::new(
            B64.decode(key_b64).map_err(|_| NoteError::MalformedKey("key is not base64"))?,
        );
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(NoteError::MalformedKey("not an Ed25519 key"));
        }
        let seed: [u8; 32] = raw[1..].try_into().map_err(|_| NoteError::MalformedKey("key length"))?;
        let signer = NoteSigner::from_seed(name, &seed)?;
        if signer.id != id {
            return Err(NoteError::MalformedKey("key id does not match the key"));
        }
        Ok(signer)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier { name: self.name.clone(), id: self.id, key: self.key.verifying_key() }
    }

    /// Signs `text` (UTF-8, ending in a newline) and returns the whole note.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        let signature: Signature = self.key.sign(text.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&signature.to_bytes());
        Ok(format!("{text}\n{SIG_PREFIX}{} {}\n", self.name, B64.encode(blob)))
    }
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') {
        return Err(NoteError::MalformedNote("text must end with a newline"));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::MalformedNote("text contains control characters"));
    }
    Ok(())
}

/// A note whose signature by `verifier` was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNote {
    pub text: String,
    pub signed_by: String,
}

/// Opens a note: it must carry a valid signature from `verifier`. Signatures from other keys
/// are ignored; a signature line that claims `verifier`'s name and id but does not verify is
/// an error.
/// The text of a signed note, **unverified**: for routing a note to its verifier (by the
/// origin on its first line) before [`open`] checks it. Never trust what it returns.
pub fn unverified_text(note: &str) -> Option<&str> {
    let split = note.rfind("\n\n")?;
    Some(&note[..split + 1])
}

pub fn open(note: &str, verifier: &NoteVerifier) -> Result<VerifiedNote, NoteError> {
    if note.len() > 1 << 20 {
        return Err(NoteError::MalformedNote("note larger than 1 MiB"));
    }
    let split = note.rfind("\n\n").ok_or(NoteError::MalformedNote("no signature block"))?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    check_text(text)?;
    if !sigs.ends_with('\n') {
        return Err(NoteError::MalformedNote("signature block must end with a newline"));
    }
    let mut verified = false;
    let lines: Vec<&str> = sigs[..sigs.len() - 1].split('\n').collect();
    if lines.len() > MAX_SIGNATURES {
        return Err(NoteError::MalformedNote("too many signatures"));
    }
    for line in lines {
        let rest = line
            .strip_prefix(SIG_PREFIX)
            .ok_or(NoteError::MalformedNote("signature line must start with an em dash"))?;
        let (name, blob) =
            rest.split_once(' ').ok_or(NoteError::MalformedNote("signature line: name and signature"))?;
        if !valid_name(name) {
            return Err(NoteError::MalformedNote("signature line: invalid key name"));
        }
        let raw = B64.decode(blob).map_err(|_| NoteError::MalformedNote("signature is not base64"))?;
        if raw.len() < 4 {
            return Err(NoteError::MalformedNote("signature too short"));
        }
        if name != verifier.name || raw[..4] != verifier.id {
            continue;
        }
        let sig_bytes: [u8; 64] =
            raw[4..].try_into().map_err(|_| NoteError::BadSignature(verifier.name.clone()))?;
        let signature = Signature::from_bytes(&sig_bytes);
        verifier
            .key
            .verify_strict(text.as_bytes(), &signature)
            .map_err(|_| NoteError::BadSignature(verifier.name.clone()))?;
        verified = true;
    }
    if !verified {
        return Err(NoteError::NotSigned(verifier.name.clone()));
    }
    Ok(VerifiedNote { text: text.to_owned(), signed_by: verifier.name.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const SKEY: &str = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    const NOTE: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn matches_the_reference_vectors_byte_for_byte() {
        let signer = NoteSigner::parse(SKEY).unwrap();
        assert_eq!(signer.verifier().vkey(), VKEY);
        assert_eq!(signer.sign(TEXT).unwrap(), NOTE);
        let verifier = NoteVerifier::parse(VKEY).unwrap();
        assert_eq!(open(NOTE, &verifier).unwrap().text, TEXT);
    }

    #[test]
    fn altered_notes_and_keys_are_refused() {
        let verifier = NoteVerifier::parse(VKEY).unwrap();
        let altered = NOTE.replace("cryptography", "cryptographY");
        assert!(matches!(open(&altered, &verifier), Err(NoteError::BadSignature(_))));
        let other = NoteSigner::from_seed("PeterNeumann", &[7; 32]).unwrap();
        let forged = other.sign(TEXT).unwrap();
        assert!(matches!(open(&forged, &verifier), Err(NoteError::NotSigned(_))));
        assert!(
            NoteVerifier::parse("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
                .is_err()
        );
        assert!(
            NoteVerifier::parse("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
                .is_err()
        );
        for bad in ["", "text without newline", "a\n\n- x y\n", "a\n\n\u{2014} PeterNeumann !!!\n"] {
            assert!(open(bad, &verifier).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mangled_vkeys_are_refused() {
        let bytes = VKEY.as_bytes();
        for i in 0..bytes.len() {
            let mut mangled = bytes.to_vec();
            mangled[i] = mangled[i].wrapping_add(1);
            if let Ok(s) = std::str::from_utf8(&mangled) {
                assert!(NoteVerifier::parse(s).is_err(), "{s}");
            }
        }
    }

    #[test]
    fn signer_debug_is_redacted() {
        let signer = NoteSigner::parse(SKEY).unwrap();
        assert!(!format!("{signer:?}").contains("AYEKFALV"));
    }
}
