//! The tuple encoding of keys (keys come back from the store and from replication): the
//! strict decoder never panics and accepts only canonical encodings.
#![no_main]

use arca_store::tuple;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(elements) = tuple::unpack(data) {
        assert_eq!(tuple::pack(&elements), data, "only the canonical encoding decodes");
    }
});
