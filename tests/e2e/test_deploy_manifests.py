"""deploy/envoy-gateway/ manifests: consistent with each other, and valid against the CRD schemas
of Envoy Gateway v1.9, Gateway API and the Inference Extension when those CRD files are present.

The CRD files are third-party generated artifacts and are not vendored here. Put them (the
`*.yaml` CustomResourceDefinitions of those releases) in a directory named by `EG_CRD_DIR`, or in
`shared/crds/` beside the repository, and these tests validate every manifest against the
`openAPIV3Schema` of its kind and version."""
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness import ROOT

DEPLOY = ROOT / "deploy" / "envoy-gateway"
KNOWN_KINDS = {
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"), ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"),
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"), ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"), ("inference.networking.k8s.io/v1", "InferencePool"),
}


def documents():
    for path in sorted(DEPLOY.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield f"{path.name}#{index}", doc


def crd_dir():
    for candidate in (os.environ.get("EG_CRD_DIR"), ROOT.parent / "shared" / "crds"):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).rglob("*.yaml")):
            return Path(candidate)
    return None


def crd_schemas(directory):
    """(apiVersion, kind) -> openAPIV3Schema of every served version in the CRD files."""
    schemas = {}
    for path in directory.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def test_every_manifest_is_a_known_kind_with_a_name():
    for where, doc in documents():
        assert (doc["apiVersion"], doc["kind"]) in KNOWN_KINDS, where
        assert doc["metadata"]["name"], where


def test_policies_use_the_module_the_envoy_proxy_registers():
    registered = {entry["name"] for where, doc in documents() if doc["kind"] == "EnvoyProxy"
                  for entry in doc["spec"].get("dynamicModules", [])}
    used = [(where, entry["name"]) for where, doc in documents() if doc["kind"] == "EnvoyExtensionPolicy"
            for entry in doc["spec"].get("dynamicModule", [])]
    assert used
    for where, name in used:
        assert name in registered, where
    for where, doc in documents():
        if doc["kind"] == "EnvoyProxy":
            for entry in doc["spec"].get("dynamicModules", []):
                # Local, never Remote: a failed remote fetch serves traffic unfiltered.
                assert entry["source"]["type"] == "Local", where
        if doc["kind"] == "EnvoyExtensionPolicy":
            for entry in doc["spec"].get("wasm", []):
                assert entry.get("failOpen") is False, f"{where}: guardrails fail closed"


def test_wasm_policies_code_sources_are_http_and_image():
    types = {entry["code"]["type"] for _, doc in documents() if doc["kind"] == "EnvoyExtensionPolicy"
             for entry in doc["spec"].get("wasm", [])}
    assert types == {"HTTP", "Image"}


@pytest.mark.skipif(crd_dir() is None, reason="no CRD files (set EG_CRD_DIR or add shared/crds/)")
def test_manifests_validate_against_the_crd_schemas():
    schemas = crd_schemas(crd_dir())
    for where, doc in documents():
        key = (doc["apiVersion"], doc["kind"])
        assert key in schemas, f"{where}: no CRD for {key}"
        jsonschema.validate(doc, schemas[key])
