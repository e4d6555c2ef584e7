//! arca's secrets node: the `arcad` server and the `arca` CLI.

#![forbid(unsafe_code)]

pub mod barrier;
pub mod policy;
