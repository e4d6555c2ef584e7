//! arca's audit log as pure data.
//!
//! Every request a node serves — reads, writes, denials, errors, logins — becomes one
//! [`Event`], appended to the region's pending queue in the same store transaction as the
//! request's own reads and writes. The sequencer turns the queue into a signed, append-only
//! Merkle log; this crate holds everything about that log that is not I/O:
//!
//! - [`event`]: the event and its versioned canonical encoding;
//! - [`merkle`]: RFC 6962 hashing, tree heads, inclusion and consistency proofs;
//! - [`note`]: C2SP signed notes with Ed25519 (key ids, vkeys, signing, verification);
//! - [`checkpoint`]: C2SP tlog-checkpoints (origin, size, root);
//! - [`tiles`]: the C2SP tlog-tiles layout (tile paths, tiles, entry bundles);
//! - [`verify`]: verifying a whole log from its tiles against a signed checkpoint.
//!
//! No I/O, no clock, no async: callers pass time in, and persist what we return.
//!
//! Invariants: an event never holds a secret value or a token; the encodings are canonical —
//! decoders accept only what encoders produce; a [`verify::VerifiedCheckpoint`] can only come
//! out of signature verification.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod event;
pub mod merkle;
pub mod note;
pub mod tiles;
pub mod verify;

pub use event::{
    Actor, DecodeError, Event, EventRef, FORMAT_V1, MAX_FIELD_BYTES, Operation, Outcome, Source,
};
