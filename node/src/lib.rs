//! arca's secrets node: the `arcad` server and the `arca` CLI.
//!
//! A request's path through the node: the transport (gRPC, [`grpc`]) builds a
//! [`node::RequestContext`] and calls an operation on [`node::Node`] ([`kv`], [`auth`],
//! [`sys`]). The operation's work — authenticate the token, check policy, read or write —
//! runs inside the group committer's batch transaction ([`committer`]) together with the
//! request's audit event; the reply leaves only after that commit, and served secret values
//! are decrypted only then ([`barrier`]).
//!
//! Invariants: no request is answered unless its audit event is durable; no secret value or
//! token reaches a log line, an error message, an audit event or a `Debug` output; the store
//! holds only ciphertext for everything but the audit queue and the seal parameters.

#![forbid(unsafe_code)]

pub mod access;
pub mod archive;
pub mod auth;
pub mod backoff;
pub mod barrier;
pub mod codec;
pub mod committer;
pub mod config;
pub mod database;
pub mod error;
pub mod grpc;
pub mod hsm;
pub mod http;
pub mod keys;
pub mod kv;
pub mod lifecycle;
pub mod listen;
pub mod memo;
pub mod metrics;
pub mod node;
pub mod outage;
mod pending;
pub mod pgtls;
pub mod policy;
pub mod region;
pub mod sequencer;
pub mod server;
pub mod sys;
pub mod vault;
pub mod wrapping;

/// Generated gRPC types and services (`proto/arca.proto`).
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("arca.v1");
}
