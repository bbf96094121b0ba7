//! The lazy field reader agrees with a full serde_json parse on every valid JSON object (and
//! refuses duplicated keys rather than guessing); never a panic on anything else.
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_core::json::{find_member, JsonError};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let lazy = find_member(data, "model");
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match lazy {
        Ok(found) => {
            let found: Option<Value> = found.map(|raw| serde_json::from_str(raw.get()).expect("raw values parse"));
            assert_eq!(found.as_ref(), doc.get("model"), "lazy and full parse disagree");
        }
        // serde_json keeps the last duplicate; the lazy reader refuses them instead.
        Err(JsonError::DuplicateKey(_)) => {}
        Err(err) => panic!("valid JSON refused: {err}"),
    }
});
