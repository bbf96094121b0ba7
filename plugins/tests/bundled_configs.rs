//! Every chain configuration shipped under envoy/chains loads with the built-in plugins (with
//! its `{{NAME}}` placeholders filled the way scripts fill them: addresses for `POD_*`).

use payload_processor_core::Chain;
use payload_processor_plugins::builtin_registry;
use std::path::Path;

#[test]
fn every_bundled_chain_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/chains");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).expect("envoy/chains exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "yaml" || ext == "json") {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("{{POD_A}}", "127.0.0.1:8001")
                .replace("{{POD_B}}", "127.0.0.1:8002")
                .replace("{{POD_C}}", "127.0.0.1:8003");
            let chain =
                Chain::load(&text, &builtin_registry()).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            assert!(chain.processor_names().count() > 0, "{} has processors", path.display());
            loaded += 1;
        }
    }
    assert!(loaded > 0, "found chains in {}", dir.display());
}
