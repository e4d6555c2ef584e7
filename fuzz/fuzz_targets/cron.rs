//! Rotation schedules (UTC cron) as users set them: never a panic, and a next time, when
//! there is one, is after the given time.
#![no_main]

use arca_node::lifecycle::cron_next;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (time, text) = data.split_at(8);
    let after = u64::from_le_bytes(time.try_into().unwrap()) % 8_000_000_000_000;
    let Ok(schedule) = std::str::from_utf8(text) else { return };
    if let Ok(next) = cron_next(schedule, after) {
        assert!(next > after);
    }
});
