//! `arcad server --config`: parsing an arbitrary file never panics.
#![no_main]

use arca_node::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Config::parse(text);
});
