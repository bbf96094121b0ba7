//! Every PII recognizer on arbitrary text: never a panic; findings in order, not overlapping,
//! inside the text and on character boundaries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_plugins::pii::{Entity, Recognizer, Text};
use std::sync::OnceLock;

/// Built once: the secret recognizer compiles an automaton and regexes.
fn recognizers() -> &'static [Box<dyn Recognizer>] {
    static ALL: OnceLock<Vec<Box<dyn Recognizer>>> = OnceLock::new();
    ALL.get_or_init(|| Entity::ALL.iter().map(|entity| entity.recognizer()).collect())
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let scan = Text::new(&text);
    for recognizer in recognizers() {
        let entity = recognizer.entity();
        let mut found = Vec::new();
        recognizer.find(&scan, &mut found);
        let mut last_end = 0;
        for span in &found {
            assert!(
                span.start < span.end && span.end <= text.len(),
                "{entity:?} span {span:?}"
            );
            assert!(span.start >= last_end, "{entity:?} spans overlap or are unordered");
            assert!(text.is_char_boundary(span.start) && text.is_char_boundary(span.end));
            last_end = span.end;
        }
    }
});
