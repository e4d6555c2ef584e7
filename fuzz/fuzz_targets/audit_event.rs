//! Audit events from the store, the Kafka stream or a verifier's input: decoding never
//! panics, and whatever decodes encodes back to the same bytes (one encoding per event).
#![no_main]

use arca_audit::event::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Event::peek_request_id(data);
    let _ = Event::peek_time_unix_ms(data);
    if let Ok(event) = Event::decode(data) {
        let again = Event::decode(&event.encode()).expect("a re-encoded event decodes");
        assert_eq!(again, event);
    }
});
