//! The conformance suite on FoundationDB (feature `fdb`).
//!
//! Needs a running cluster: `FDB_CLUSTER_FILE` names its cluster file (FoundationDB's
//! default path otherwise). Each case works under its own random prefix and clears it first,
//! so the suite can share a test cluster; never point it at a production cluster.
//! No FoundationDB client library can be installed on arca's build machines, so CI only
//! type-checks this file (`cargo check --all-targets --features fdb`).

#![cfg(feature = "fdb")]

mod conformance;

use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;
use std::time::Duration;

use arca_store::fdb::{FdbConfig, FdbNetwork, FdbStore};
use arca_store::tuple::{self, Element};
use arca_store::{StoreExt, prefix_end};
use conformance::Fixture;

/// The network thread lives for the whole test process; test binaries exit without
/// dropping statics, which FoundationDB tolerates (the process ends).
fn network() -> &'static FdbNetwork {
    static NETWORK: OnceLock<FdbNetwork> = OnceLock::new();
    NETWORK.get_or_init(|| FdbNetwork::boot().expect("boot the FoundationDB network"))
}

fn fixture(case: &str) -> Fixture {
    fixture_with_timeout(case, arca_store::limits::MAX_TRANSACTION_DURATION)
}

fn fixture_with_timeout(case: &str, timeout: Duration) -> Fixture {
    let config = FdbConfig {
        cluster_file: std::env::var("FDB_CLUSTER_FILE").ok(),
        transaction_timeout: timeout,
        ..FdbConfig::default()
    };
    let store = FdbStore::open(network(), config).expect("open the FoundationDB cluster");
    let nonce = RandomState::new().hash_one(case);
    let root = tuple::pack(&[Element::from("arca-conformance"), case.into(), nonce.into()]);
    let end = prefix_end(&root).expect("tuple prefixes never end in 0xFF");
    store.transact(|tx| tx.clear_range(&root, &end)).expect("clear the case's prefix");
    Fixture { store: Box::new(store), root, keep_alive: Box::new(()) }
}

suite!(fixture, fixture_with_timeout);
