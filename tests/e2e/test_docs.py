"""The docs: every plugin type has its page, and every YAML example in them loads.

Chains (a mapping with `processors`, or a list of processors) are loaded by the offline CLI
exactly as the filter loads them, with no deprecation warning; Envoy and Kubernetes snippets
must at least be valid YAML. The agentgateway habit: no example rots unnoticed.
"""
import functools
import json
import re
import subprocess

import pytest
import yaml

from harness import DIST, ROOT, wordllama_files

CLI = DIST / "payload-processor"
DOCS = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def yaml_blocks():
    return [
        pytest.param(path, match.group(1), id=f"{path.relative_to(ROOT)}#{number}")
        for path in DOCS
        for number, match in enumerate(BLOCK.finditer(path.read_text()), 1)
    ]


@functools.lru_cache(maxsize=None)
def registry_types():
    schema = json.loads(subprocess.run([CLI, "schema"], capture_output=True, check=True).stdout)
    return schema["$defs"]["ProcessorConfig"]["properties"]["type"]["enum"]


def test_every_plugin_type_has_its_page_with_a_full_example():
    types = registry_types()
    assert len(types) >= 12
    for plugin_type in types:
        page = ROOT / "docs" / "plugins" / f"{plugin_type}.md"
        assert page.exists(), f"docs/plugins/{plugin_type}.md is missing"
        chains = [yaml.safe_load(block) for block in BLOCK.findall(page.read_text())]
        assert any(
            isinstance(chain, dict) and any(p.get("type") == plugin_type for p in chain.get("processors", []))
            for chain in chains
        ), f"docs/plugins/{plugin_type}.md has no chain example using {plugin_type}"
    pages = {page.stem for page in (ROOT / "docs" / "plugins").glob("*.md")}
    assert pages == set(types), f"pages without a plugin type: {pages - set(types)}"


def test_the_docs_have_examples():
    assert len(yaml_blocks()) >= 15, "the example finder found too few examples"


@pytest.mark.parametrize("path,block", yaml_blocks())
def test_docs_yaml_example_loads(path, block, tmp_path):
    documents = list(yaml.safe_load_all(block))
    assert documents, "an empty example"
    types = set(registry_types())
    for document in documents:
        if isinstance(document, list) and document and all(isinstance(p, dict) and p.get("type") in types for p in document):
            document = {"processors": document}
        if not (isinstance(document, dict) and "processors" in document):
            continue  # an Envoy or Kubernetes snippet: parsing it was the check
        chain = tmp_path / "chain.json"
        chain.write_text(json.dumps(document))
        # Examples name model files under models/, relative to the working directory, as a
        # deployment would lay them out; here they come from the installed wordllama wheel.
        models = tmp_path / "models"
        models.mkdir(exist_ok=True)
        for model_file in wordllama_files():
            if not (models / model_file.name).exists():
                (models / model_file.name).symlink_to(model_file)
        (tmp_path / "target").mkdir(exist_ok=True)
        if not (tmp_path / "target" / "injection").exists():
            (tmp_path / "target" / "injection").symlink_to(ROOT / "target" / "injection")
        out = subprocess.run([CLI, "validate", chain], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, f"{path}: {out.stderr}"
        assert "deprecated" not in out.stderr, f"{path}: examples use the current spelling: {out.stderr}"


def test_relative_links_in_the_docs_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for path in DOCS:
        for target in link.findall(path.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken
