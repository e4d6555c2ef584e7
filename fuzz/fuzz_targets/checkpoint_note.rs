//! Signed notes and checkpoints as a SIEM consumer or auditor receives them: parsing and
//! verification never panic, a parsed checkpoint prints back to text that parses the same,
//! and nothing but a real signature verifies.
#![no_main]

use arca_audit::{checkpoint, note};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = checkpoint::Checkpoint::parse(text) {
        let again = checkpoint::Checkpoint::parse(&parsed.to_text()).expect("printed checkpoint parses");
        assert_eq!(again, parsed);
    }
    let _ = note::NoteVerifier::parse(text);
    let _ = note::NoteSigner::parse(text);
    let _ = note::unverified_text(text);
    let signer = note::NoteSigner::from_seed("fuzz.example/log", &[7; 32]).unwrap();
    let verifier = signer.verifier();
    // Without this key's signature (which no input can forge), nothing opens.
    assert!(note::open(text, &verifier).is_err());
    assert!(checkpoint::open(text, &verifier).is_err());
});
