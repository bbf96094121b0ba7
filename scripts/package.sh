#!/usr/bin/env bash
# Writes the artifacts a user pulls or serves, into dist/ (after scripts/build.sh):
#   dist/payload_processor.wasm.sha256, dist/libpayload_processor.so.sha256
#       checksums for Envoy Gateway's HTTP wasm source and Remote module source;
#   dist/oci/payload-processor-wasm/
#       the .wasm as a Wasm OCI artifact in an OCI image layout (config
#       application/vnd.module.wasm.config.v1+json, one layer
#       application/vnd.module.wasm.content.layer.v1+wasm), tagged with the crate version, for
#       EG's Image source. Push it with `skopeo copy oci:dist/oci/payload-processor-wasm:<v>
#       docker://<registry>/<repo>:<v>` (or `oras copy --from-oci-layout`);
#   dist/image/  a build context (Dockerfile + .so) for the module image that EnvoyProxy's
#       image volume or init container (deploy/envoy-gateway/) reads the .so from, and
#       Dockerfile.envoy, an Envoy image with the .so baked in.
# skopeo (Debian package) writes the OCI layout from the blobs and manifest made here.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "${SKIP_BUILD:-0}" = 1 ] || scripts/build.sh >/dev/null
if ! command -v skopeo >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q skopeo >/dev/null
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

(cd dist && sha256sum payload_processor.wasm > payload_processor.wasm.sha256 \
  && sha256sum libpayload_processor.so > libpayload_processor.so.sha256)

# The Wasm OCI artifact: blobs and manifest in skopeo's directory transport, copied into an
# OCI image layout by skopeo (which writes oci-layout, index.json and checks every digest).
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
python3 - "$staging" "$version" <<'PY'
import hashlib, json, sys
from pathlib import Path

staging, version = Path(sys.argv[1]), sys.argv[2]
wasm = Path("dist/payload_processor.wasm").read_bytes()
config = json.dumps({"created": "1970-01-01T00:00:00Z", "author": "envoy-payload-processor",
                     "type": "envoy-payload-processor", "version": version},
                    separators=(",", ":")).encode()

def blob(data):
    digest = hashlib.sha256(data).hexdigest()
    (staging / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}

manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.module.wasm.config.v1+json", **blob(config)},
    "layers": [{"mediaType": "application/vnd.module.wasm.content.layer.v1+wasm", **blob(wasm),
                "annotations": {"org.opencontainers.image.title": "plugin.wasm"}}],
    "annotations": {"org.opencontainers.image.title": "payload-processor-wasm",
                    "org.opencontainers.image.version": version},
}
(staging / "manifest.json").write_text(json.dumps(manifest))
(staging / "version").write_text("Directory Transport Version: 1.1\n")
PY
rm -rf dist/oci/payload-processor-wasm
mkdir -p dist/oci
skopeo copy --quiet "dir:$staging" "oci:dist/oci/payload-processor-wasm:$version"

# The module image's build context (no container engine runs here; build it where one does).
rm -rf dist/image
mkdir -p dist/image
cp dist/libpayload_processor.so dist/image/
cp deploy/envoy-gateway/Dockerfile.module dist/image/Dockerfile
cp deploy/envoy-gateway/Dockerfile.envoy dist/image/Dockerfile.envoy
echo "packaged $version:"
ls -l dist/*.sha256 dist/image
find dist/oci -type f | sort
