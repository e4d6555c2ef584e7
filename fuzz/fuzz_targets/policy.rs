//! Policies and CIDRs as operators write them: parsing never panics.
#![no_main]

use arca_node::policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = policy::parse(text);
    let _ = policy::Cidr::parse(text);
});
