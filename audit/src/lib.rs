//! arca's audit log as pure data.
//!
//! Every request a node serves — reads, writes, denials, errors, logins — becomes one
//! [`Event`], appended to the region's pending queue in the same store transaction as the
//! request's own reads and writes. This crate defines the event and its canonical encoding;
//! the signed Merkle log built from encoded events comes later, here too.
//!
//! No I/O, no clock, no async: callers pass time in, and persist what we return.
//!
//! Invariants: an event never holds a secret value or a token (the actor is named by entity
//! and token accessor); the encoding is canonical — one byte string per event, and
//! [`Event::decode`] accepts only what [`Event::encode`] produces.

#![forbid(unsafe_code)]

mod event;

pub use event::{Actor, DecodeError, Event, FORMAT_V1, MAX_FIELD_BYTES, Operation, Outcome, Source};
