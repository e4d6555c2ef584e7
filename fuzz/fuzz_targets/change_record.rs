//! Replication change records, as a standby receives them from the primary.
#![no_main]

use arca_replication::ChangeRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = ChangeRecord::decode(data) {
        let again = ChangeRecord::decode(&record.encode()).expect("a re-encoded record decodes");
        assert_eq!(again, record);
    }
});
