"""Bad configurations are refused by Envoy at load, with a path-qualified message in its log;
the offline CLI refuses them with the same message."""
import subprocess
import time

import pytest

from harness import DIST, Envoy, bootstrap, cluster, processor_filter


def cli_validate(form, text, tmp_path):
    """(exit code, the reason after `invalid configuration: `, stderr) of the CLI on `text`."""
    chain = tmp_path / "chain.yaml"
    chain.write_text(text)
    out = subprocess.run([DIST / "payload-processor", "validate", "--form", form, chain],
                         capture_output=True, text=True)
    _, _, reason = out.stderr.partition("invalid configuration: ")
    return out.returncode, reason.strip(), out.stderr

BAD_CONFIGS = [
    ("injection-classifier-missing-file",
     "processors: [{name: g, type: prompt-guard, parameters: {builtin: [prompt-injection], "
     "injection: {classifier: {weights: /nonexistent/injection.safetensors}}}}]",
     "processors[0].parameters.injection.classifier.weights: cannot read"),
    ("injection-classifier-not-safetensors",
     "processors: [{name: g, type: prompt-guard, parameters: {builtin: [prompt-injection], "
     "injection: {classifier: {weightsBase64: aGVsbG8gd29ybGQ=}}}}]",
     "processors[0].parameters.injection.classifier.weightsBase64: not a safetensors file"),
    # A weights tensor of 128 where the metadata says 256 buckets.
    ("injection-classifier-wrong-shape",
     "processors: [{name: g, type: prompt-guard, parameters: {builtin: [prompt-injection], "
     "injection: {classifier: {weightsBase64: MgEAAAAAAAB7IndlaWdodHMiOnsiZHR5cGUiOiJJOCIsInNoYXBlIjpbMTI4XSwiZGF0YV9vZmZzZXRzIjpbMCwxMjhdfSwic2NhbGUiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOlsxMjgsMTMyXX0sImJpYXMiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOlsxMzIsMTM2XX0sIl9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJwYXlsb2FkLXByb2Nlc3Nvci1pbmplY3Rpb24tdjEiLCJidWNrZXRzIjoiMjU2Iiwid2luZG93IjoiMTI4Iiwic3RyaWRlIjoiOTYiLCJ0aHJlc2hvbGQiOiIwLjUifX0AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAM3MzD0AAEDA}}}}]",
     "processors[0].parameters.injection.classifier.weightsBase64: tensor \"weights\" is I8 [128], expected I8 [256]"),
    ("pii-guard-unknown-entity", "processors: [{name: a, type: pii-guard, parameters: {entities: [email, passport]}}]",
     "processors[0].parameters.entities[1]: unknown variant `passport`"),
    ("pii-guard-invalid-regex",
     "processors: [{name: a, type: pii-guard, parameters: {customPatterns: [{name: x, regex: 'a(b'}]}}]",
     "processors[0].parameters.customPatterns[0].regex: regex parse error"),
    ("prompt-guard-invalid-regex", "processors: [{name: a, type: prompt-guard, parameters: {deny: [{name: x, regex: '[z-a]'}]}}]",
     "processors[0].parameters.deny[0].regex: regex parse error"),
    ("prompt-guard-empty-keywords", "processors: [{name: a, type: prompt-guard, parameters: {deny: [{name: x, keywords: []}]}}]",
     "processors[0].parameters.deny[0].keywords: the keyword list is empty"),
    ("endpoint-picker-bad-address",
     "processors: [{name: a, type: endpoint-picker, parameters: {endpoints: ['10.0.0.1:8000', {address: 'pod-2'}]}}]",
     'processors[0].parameters.endpoints[1].address: "pod-2" is not an ip:port address'),
    ("endpoint-picker-negative-weight",
     "processors: [{name: a, type: endpoint-picker, parameters: {endpoints: ['10.0.0.1:8000'], scorers: {kvCache: -2}}}]",
     "processors[0].parameters.scorers.kvCache: weight -2 must be a finite number >= 0"),
    ("unknown-type", "processors: [{name: a, type: no-such-plugin}]",
     'processors[0].type: unknown plugin type "no-such-plugin"; known types: base-model-to-header, body-field-to-header'),
    ("unknown-field", "processors: [{name: a, type: body-field-to-header, parameters: {feildName: model}}]",
     "processors[0].parameters.feildName: unknown field `feildName`"),
    ("unknown-top-level-field", "procesors: []", "procesors: unknown field `procesors`"),
    ("duplicate-name", "processors: [{name: a, type: body-field-to-header}, {name: a, type: base-model-to-header}]",
     'processors[1].name: duplicate processor name "a"'),
    ("bad-jsonpath", "processors: [{name: a, type: body-field-to-header, parameters: {fieldName: '$.[bad'}}]",
     "processors[0].parameters.fieldName: invalid JSONPath"),
    ("bad-duration", "processors: [{name: a, type: body-field-to-header, timeout: 2 parsecs}]",
     'processors[0].timeout: invalid duration "2 parsecs"'),
    ("bad-failure-mode", "processors: [{name: a, type: body-field-to-header, failureMode: Sometimes}]",
     "processors[0].failureMode: unknown variant `Sometimes`"),
    ("bad-match-regex", "processors: [{name: a, type: body-field-to-header, match: {headers: [{name: x, regex: '('}]}}]",
     "processors[0].match.headers[0].regex:"),
    ("not-yaml", "processors: [", "invalid YAML"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_envoy_refuses_bad_config_with_path(form, text, expected, tmp_path):
    config = bootstrap([processor_filter(form, text)], [{"match": {"prefix": "/"}, "route": {"cluster": "x"}}],
                       [cluster("x", 9)])
    envoy = Envoy(config)
    code = envoy.wait_exit()
    log = envoy.log()
    assert code != 0
    assert expected in log, log[-3000:]
    # The CLI never disagrees with Envoy: it refuses the same chain with the same message.
    cli_code, reason, stderr = cli_validate("wasm" if form.startswith("wasm") else "so", text, tmp_path)
    assert cli_code == 1, stderr
    assert expected in reason, stderr
    assert reason.splitlines()[0] in log, (reason, log[-3000:])


def test_old_spellings_load_with_a_deprecation_warning_in_envoys_log(form, tmp_path):
    """Enum values spelt the pre-vocabulary way still load, and Envoy's log says what to write."""
    text = ("processors: [{name: g, type: pii-guard, parameters: {entities: [credit_card, Email]}}, "
            "{name: p, type: prompt-guard, parameters: {builtin: [prompt-injection]}}]")
    config = bootstrap([processor_filter(form, text)], [{"match": {"prefix": "/"}, "route": {"cluster": "x"}}],
                       [cluster("x", 9)])
    envoy = Envoy(config)
    try:
        envoy.wait_ready()
        wanted = [f'configuration value "{old}" is a deprecated spelling; write "{new}"'
                  for old, new in (("credit_card", "CreditCard"), ("prompt-injection", "PromptInjection"))]
        # Envoy flushes its log file on its own schedule: give it a few seconds.
        deadline = time.monotonic() + 10
        while not all(w in envoy.log() for w in wanted) and time.monotonic() < deadline:
            time.sleep(0.2)
        log = envoy.log()
        for w in wanted:
            assert w in log, log[-3000:]
    finally:
        envoy.stop()
    code, _, stderr = cli_validate("so", text, tmp_path)
    assert code == 0 and 'write "CreditCard"' in stderr, stderr


def test_every_bundled_bootstrap_loads(form):
    """Each Envoy config under envoy/ renders and starts with this form."""
    from harness.render import bundled_bootstraps, render

    paths = bundled_bootstraps(form)
    assert paths, f"a bundled bootstrap for {form}"
    for path in paths:
        envoy = Envoy(render(path, {"LISTEN_PORT": 0, "ADMIN_PORT": 0, "UPSTREAM_A_PORT": 9, "UPSTREAM_B_PORT": 9,
                                    "UPSTREAM_C_PORT": 9, "UPSTREAM_DEFAULT_PORT": 9,
                                    "WASM_PATH": DIST / "payload_processor.wasm", "ACCESS_LOG": "/dev/null",
                                    "POOL_LISTEN_PORT": 0, "POD_A": "127.0.0.1:9", "POD_B": "127.0.0.1:10",
                                    "POD_C": "127.0.0.1:11", "MODELS_PORT": 9, "SERVICES_PORT": 9}))
        try:
            envoy.wait_ready()
        finally:
            envoy.stop()
