"""scripts/package.sh: checksums for HTTP/Remote sources, the Wasm OCI artifact layout EG's Image
source accepts, and the module image's build context."""
import hashlib
import json
import os
import subprocess

import pytest

from harness import DIST, ROOT

LAYOUT = DIST / "oci" / "payload-processor-wasm"


@pytest.fixture(scope="module")
def packaged():
    subprocess.run([str(ROOT / "scripts" / "package.sh")], check=True, capture_output=True,
                   env=dict(os.environ, SKIP_BUILD="1"))


def blob(digest):
    algorithm, hex_digest = digest.split(":")
    assert algorithm == "sha256"
    data = (LAYOUT / "blobs" / "sha256" / hex_digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hex_digest, "a blob's bytes match its digest"
    return data


def test_checksum_files_match_the_artifacts(packaged):
    for name in ("payload_processor.wasm", "libpayload_processor.so"):
        line = (DIST / f"{name}.sha256").read_text().split()
        assert line == [hashlib.sha256((DIST / name).read_bytes()).hexdigest(), name]


def test_oci_layout_holds_the_wasm_as_a_wasm_artifact(packaged):
    assert json.loads((LAYOUT / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((LAYOUT / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    version = next(line.split('"')[1] for line in (ROOT / "Cargo.toml").read_text().splitlines()
                   if line.startswith("version = "))
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == version
    manifest_bytes = blob(entry["digest"])
    assert len(manifest_bytes) == entry["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json"
    config = blob(manifest["config"]["digest"])
    assert len(config) == manifest["config"]["size"]
    json.loads(config)
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm"
    wasm = blob(layer["digest"])
    assert len(wasm) == layer["size"]
    assert wasm == (DIST / "payload_processor.wasm").read_bytes()
    assert wasm[:4] == b"\0asm"


def test_module_image_context_carries_the_so_at_the_documented_path(packaged):
    context = DIST / "image"
    assert (context / "libpayload_processor.so").read_bytes() == (DIST / "libpayload_processor.so").read_bytes()
    dockerfile = (context / "Dockerfile").read_text()
    assert "COPY libpayload_processor.so /libpayload_processor.so" in dockerfile
    # The manifests read it from there.
    init = (ROOT / "deploy" / "envoy-gateway" / "envoy-proxy-init-container.yaml").read_text()
    assert "/libpayload_processor.so" in init
    envoy = (context / "Dockerfile.envoy").read_text()
    assert "/usr/lib/envoy/modules/payload-processor/libpayload_processor.so" in envoy
