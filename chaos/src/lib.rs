//! arca's chaos harness: real processes on loopback (`cluster`), fault-injecting proxies
//! (`proxy`), a workload that records its history (`client`), seeded scenarios
//! (`scenario`), invariant checkers (`check`), reports (`report`) and the regional
//! failover drill (`drill`).

#![deny(unsafe_code)]

pub mod check;
pub mod client;
pub mod cluster;
pub mod drill;
pub mod proxy;
pub mod report;
pub mod rng;
pub mod scenario;
