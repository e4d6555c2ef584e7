//! tlog-tiles paths (from HTTP requests) and tile / entry-bundle bodies (from the store or
//! an archive): never a panic, and bundles split back into what was pushed.
#![no_main]

use arca_audit::tiles;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = tiles::parse_path(path);
    }
    let _ = tiles::tile_hashes(data);
    if let Ok(entries) = tiles::bundle_entries(data) {
        let mut bundle = Vec::new();
        for entry in &entries {
            tiles::bundle_push(&mut bundle, entry).expect("a parsed entry can be pushed");
        }
        assert_eq!(bundle, data);
    }
});
