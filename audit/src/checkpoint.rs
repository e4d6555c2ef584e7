//! C2SP tlog-checkpoints: the signed statement "the log `origin` has `size` entries with
//! root `root`", as the text of a signed note:
//!
//! ```text
//! arca/<cluster>/<region>
//! 1234
//! <base64 root>
//! ```
//!
//! A [`VerifiedCheckpoint`] can only be obtained by [`open`], which checks the signature.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::merkle::Hash;
use crate::note::{self, NoteError, NoteSigner, NoteVerifier};

/// A checkpoint's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// Optional extension lines, kept as they are.
    pub extensions: Vec<String>,
}

/// Why a checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    #[error("checkpoint origin is {found:?}, expected {expected:?}")]
    WrongOrigin { expected: String, found: String },
    #[error(transparent)]
    Note(#[from] NoteError),
}

impl Checkpoint {
    /// The checkpoint's note text.
    pub fn to_text(&self) -> String {
        let mut text = format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root));
        for line in &self.extensions {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Parses checkpoint text strictly.
    pub fn parse(text: &str) -> Result<Checkpoint, CheckpointError> {
        let body = text.strip_suffix('\n').ok_or(CheckpointError::Malformed("must end with a newline"))?;
        let mut lines = body.split('\n');
        let origin =
            lines.next().filter(|o| !o.is_empty()).ok_or(CheckpointError::Malformed("missing origin"))?;
        let size_text = lines.next().ok_or(CheckpointError::Malformed("missing size"))?;
        let canonical = size_text == "0" || (!size_text.starts_with('0') && !size_text.is_empty());
        if !canonical || !size_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CheckpointError::Malformed("size must be a canonical decimal number"));
        }
        let size = size_text.parse().map_err(|_| CheckpointError::Malformed("size out of range"))?;
        let root_text = lines.next().ok_or(CheckpointError::Malformed("missing root hash"))?;
        let root: Hash = B64
            .decode(root_text)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or(CheckpointError::Malformed("root must be a base64 SHA-256 hash"))?;
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(CheckpointError::Malformed("empty extension line"));
        }
        Ok(Checkpoint { origin: origin.to_owned(), size, root, extensions })
    }

    /// Signs the checkpoint: the signer's key name must be the origin.
    pub fn sign(&self, signer: &NoteSigner) -> Result<String, CheckpointError> {
        if signer.name() != self.origin {
            return Err(CheckpointError::WrongOrigin {
                expected: self.origin.clone(),
                found: signer.name().to_owned(),
            });
        }
        Ok(signer.sign(&self.to_text())?)
    }
}

/// A checkpoint whose signature was verified with the log's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    checkpoint: Checkpoint,
    note: String,
}

impl VerifiedCheckpoint {
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    pub fn size(&self) -> u64 {
        self.checkpoint.size
    }

    pub fn root(&self) -> &Hash {
        &self.checkpoint.root
    }

    /// The signed note, as received.
    pub fn note(&self) -> &str {
        &self.note
    }
}

/// Verifies a signed checkpoint with the log's key; the origin must be the key's name.
pub fn open(signed: &str, verifier: &NoteVerifier) -> Result<VerifiedCheckpoint, CheckpointError> {
    let verified = note::open(signed, verifier)?;
    let checkpoint = Checkpoint::parse(&verified.text)?;
    if checkpoint.origin != verifier.name() {
        return Err(CheckpointError::WrongOrigin {
            expected: verifier.name().to_owned(),
            found: checkpoint.origin,
        });
    }
    Ok(VerifiedCheckpoint { checkpoint, note: signed.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_verifies() {
        let signer = NoteSigner::from_seed("arca/prod/eu", &[9; 32]).unwrap();
        let cp = Checkpoint { origin: "arca/prod/eu".into(), size: 1234, root: [7; 32], extensions: vec![] };
        let signed = cp.sign(&signer).unwrap();
        assert!(signed.starts_with(
            "arca/prod/eu\n1234\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n\n\u{2014} arca/prod/eu "
        ));
        let verified = open(&signed, &signer.verifier()).unwrap();
        assert_eq!(verified.checkpoint(), &cp);
        let other = NoteSigner::from_seed("arca/prod/us", &[9; 32]).unwrap();
        assert!(cp.sign(&other).is_err(), "a key only signs its own origin");
    }

    #[test]
    fn strict_parsing() {
        let root = B64.encode([1u8; 32]);
        assert!(Checkpoint::parse(&format!("o\n5\n{root}\n")).is_ok());
        assert!(Checkpoint::parse(&format!("o\n5\n{root}\next\n")).is_ok());
        for bad in [
            format!("o\n05\n{root}\n"),
            format!("o\n-5\n{root}\n"),
            format!("o\n5\n{root}"),
            "o\n5\nAAAA\n".to_owned(),
            format!("\n5\n{root}\n"),
            format!("o\n5\n{root}\n\n"),
            "o\n".to_owned(),
        ] {
            assert!(Checkpoint::parse(&bad).is_err(), "{bad:?}");
        }
    }
}
