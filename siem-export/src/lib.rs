//! SIEM export: a region's audit log published to Kafka as OCSF API Activity events, with
//! its signed checkpoints beside it; a verifier that proves a consumed stream complete and
//! unaltered; and a watcher that raises alerts on anomalous access.
//!
//! The `arca-siem` binary runs each of them (`export`, `verify`, `watch`, `status`).

#![forbid(unsafe_code)]

pub mod config;
pub mod export;
pub mod kafka;
pub mod ocsf;
pub mod seed;
pub mod verify;
pub mod watch;
