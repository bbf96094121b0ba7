//! SSE parsing does not depend on how the bytes were split: the first byte picks a chunk size,
//! the rest is the stream; chunked and whole parsing give the same events.
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_core::sse::SseParser;

fn events(chunks: &[&[u8]]) -> Vec<(Option<String>, Option<String>, Option<String>)> {
    let mut parser = SseParser::new(1 << 16);
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        parser.push(chunk);
        let last = i + 1 == chunks.len();
        while let Ok(Some(event)) = parser.next_event(last) {
            out.push((
                event.event_type().map(str::to_string),
                event.data().map(str::to_string),
                event.id().map(str::to_string),
            ));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&size, stream)) = data.split_first() else {
        return;
    };
    let size = usize::from(size % 17) + 1;
    let whole = events(&[stream]);
    let chunks: Vec<&[u8]> = stream.chunks(size).collect();
    let split = if chunks.is_empty() {
        events(&[stream])
    } else {
        events(&chunks)
    };
    assert_eq!(whole, split, "events depend on the split (chunks of {size})");
});
