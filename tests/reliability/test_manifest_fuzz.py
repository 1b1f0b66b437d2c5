"""Fuzzed manifests (issue 9): a valid bundle's manifest.json mutated at a random key path (a value replaced
by any JSON value, including NaN/inf, huge numbers, unicode, deep nesting; a key deleted; an extra key
added), or replaced by broken bytes, then `kdtool bench`. The promise: never a traceback; exit 0 (the
mutation still fits the schema), 1 (a check failed, the report written), or 2 with one line naming the
manifest. Family: manifest_fuzz (one trial per example).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdtool.cli import cli
from kdtool.export import export_bundle
from runs import reference  # noqa: F401
from test_bundle_faults import FAST_BENCH, FP32_ONLY

CI_EXAMPLES = 200

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


def key_paths(node, prefix=()) -> list[tuple]:
    """Every key path of a JSON document (dict keys and list indices), the root included."""
    paths = [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        paths += key_paths(child, (*prefix, key))
    return paths


def mutate(document: dict, path: tuple, action: str, value) -> object:
    """`document` with the node at `path` replaced by `value`, deleted, or given an extra key."""
    if not path:
        return value if action == "replace" else document
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last]["unexpected_key"] = value
    return document


@pytest.fixture(scope="module")
def bundle(reference, tmp_path_factory) -> Path:
    return export_bundle(reference[0], out=tmp_path_factory.mktemp("fuzz") / "bundle", overrides=FP32_ONLY,
                         progress=False)


def bench_outcome(bundle: Path, manifest_bytes: bytes) -> str:
    """'ok', or what broke the promise."""
    with tempfile.TemporaryDirectory() as folder:
        fuzzed = Path(shutil.copytree(bundle, Path(folder) / "bundle"))
        (fuzzed / "manifest.json").write_bytes(manifest_bytes)
        result = CliRunner().invoke(cli, ["bench", str(fuzzed), *FAST_BENCH])
    if (result.exception and not isinstance(result.exception, SystemExit)) or "Traceback" in result.output:
        return f"traceback: {type(result.exception).__name__}: {result.exception}"
    if result.exit_code not in (0, 1, 2):
        return f"exit code {result.exit_code}: {result.output[-300:]}"
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        if len(result.output.strip().splitlines()) != 1 or len(errors) != 1:
            return f"not one error line: {result.output[-300:]}"
        if "manifest" not in errors[0] and str(fuzzed) not in errors[0]:
            return f"the manifest is not named: {errors[0]}"
    if result.exit_code == 1 and "gate passed" in result.output:
        return f"'gate passed' with exit 1: {result.output[-300:]}"
    return "ok"


@settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_manifest_never_gives_a_traceback(bundle, data, fault_trials):
    document = json.loads((bundle / "manifest.json").read_text())
    path = data.draw(st.sampled_from(key_paths(document)), label="path")
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    value = data.draw(json_values, label="value")
    fuzzed = json.dumps(mutate(document, path, action, value), allow_nan=True).encode()
    with fault_trials("manifest_fuzz").trial():
        assert bench_outcome(bundle, fuzzed) == "ok", (path, action, value)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"[" * 100_000, b'{"format": ' * 5_000,
                                     b"null", b"[]", b'"a string"', b"1e999", b"{" + b'"a": 1, ' * 50_000 + b"}"])
def test_broken_manifest_bytes(bundle, content, fault_trials):
    with fault_trials("manifest_fuzz").trial():
        assert bench_outcome(bundle, content) == "ok"
