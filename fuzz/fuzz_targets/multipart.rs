//! json-to-multipart on arbitrary bodies: never a panic; a converted request is multipart with
//! a boundary that appears nowhere inside its parts and a matching content-length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_core::testing::{run_request_phase, FakeHost};
use payload_processor_core::{Chain, Direction, Stream};
use payload_processor_plugins::builtin_registry;
use std::sync::{Arc, OnceLock};

fn chain() -> Arc<Chain> {
    static CHAIN_ONCE: OnceLock<Arc<Chain>> = OnceLock::new();
    CHAIN_ONCE
        .get_or_init(|| {
            let yaml = "processors: [{name: mp, type: json-to-multipart, parameters: {fileFields: [{field: file}]}}]";
            Arc::new(Chain::load(yaml, &builtin_registry()).expect("fuzz chain loads"))
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut host = FakeHost::request(
        "/v1/audio/transcriptions",
        &[("content-type", "application/json")],
        data,
    );
    run_request_phase(&mut Stream::new(chain()), &mut host);
    let content_type = host.header_values(Direction::Request, "content-type").join(",");
    if host.reply.is_none() && content_type.starts_with("multipart/form-data") {
        let boundary = content_type
            .split("boundary=")
            .nth(1)
            .expect("a boundary")
            .trim_matches('"');
        let delimiter = format!("--{boundary}");
        let body = String::from_utf8_lossy(&host.request_body);
        // Split at the delimiter: a boundary occurring inside a part would leave a piece that
        // is not a part header (or the closing `--`).
        let pieces: Vec<&str> = body.split(delimiter.as_str()).collect();
        assert!(pieces.len() >= 3, "an opening and a closing delimiter around a part");
        assert_eq!(pieces[0], "", "the body starts with the delimiter");
        assert_eq!(
            *pieces.last().unwrap(),
            "--\r\n",
            "the body ends with the closing delimiter"
        );
        for piece in &pieces[1..pieces.len() - 1] {
            assert!(
                piece.starts_with("\r\nContent-Disposition: form-data; name="),
                "stray delimiter"
            );
            assert!(
                piece.ends_with("\r\n"),
                "a part ends with CRLF before the next delimiter"
            );
        }
        assert_eq!(
            host.header_values(Direction::Request, "content-length"),
            vec![host.request_body.len().to_string()]
        );
    }
});
