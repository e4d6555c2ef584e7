//! A secret's data, as the node takes it in: the JSON a read parses from storage, the HTTP
//! API's merge patch (RFC 7396), the data checks, and the gRPC wire form (`json_keys`).
//! Never a panic; a merge patch applied twice changes nothing more; checked data survives
//! the wire and storage exactly.
#![no_main]

use arca_node::grpc::{data_from_wire, data_to_wire};
use arca_node::kv::{SecretData, merge_patch, validate_data};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // As a stored version is read back.
    let _ = serde_json::from_slice::<SecretData>(data);
    let (a, b) = match data.iter().position(|&x| x == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{}"[..]),
    };
    let (Ok(target), Ok(patch)) = (serde_json::from_slice::<Value>(a), serde_json::from_slice::<Value>(b))
    else {
        return;
    };
    let merged = merge_patch(target, patch.clone());
    assert_eq!(merge_patch(merged.clone(), patch.clone()), merged, "a merge patch is idempotent");
    if patch.is_object() {
        assert!(merged.is_object(), "an object patch makes an object");
    }
    let Value::Object(fields) = merged else { return };
    let secret = SecretData(fields.into_iter().collect());
    if validate_data(&secret).is_err() {
        return;
    }
    // Storage: the JSON the node writes parses back to the same data.
    let stored = serde_json::to_vec(&secret).unwrap();
    assert_eq!(serde_json::from_slice::<SecretData>(&stored).unwrap(), secret);
    // The gRPC wire: strings as they are, the rest as JSON text named in json_keys.
    let mut moved = secret.clone();
    let (wire, json_keys) = data_to_wire(&mut moved);
    assert!(moved.0.is_empty(), "the values moved out");
    assert!(json_keys.iter().all(|k| !secret.0[k].is_string()));
    assert_eq!(data_from_wire(wire, &json_keys).unwrap(), secret);
});
