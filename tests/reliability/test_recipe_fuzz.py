"""Recipes fuzzed over the schema and over YAML itself: never a traceback; exit 0, or exit 2 in one line
naming the key (or the file).

Cases: one key of the quickstart replaced, deleted or added (any YAML value, hostile numbers: NaN,
inf, negative, past 2**32); `--set` overrides of any key path; whole files with alias bombs,
recursive aliases, merge-key chains and deep nesting. benchmarks/recipe_fuzz_soak.py runs the same
cases 10,000 at a time and counts the failures instead of stopping at the first.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdtool.cli import cli
from kdtool.cli.common import _printable
from kdtool.recipe import METHOD_SETTINGS
from runs import QUICKSTART

CI_EXAMPLES = 500
BASE = yaml.safe_load(QUICKSTART.read_text())
HEADER = "name: fuzz\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n"

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
hostile_numbers = st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, -0.0, 2**32, 2**63, 10**30, 1e308, -1e-300, 0.5])
scalars = st.one_of(st.none(), st.booleans(), text, st.integers(min_value=-10**30, max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), hostile_numbers)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
                      max_leaves=5)


def paths(node, prefix=()):
    """Every key path of the recipe, sections included."""
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from paths(value, prefix + (key,))


METHOD_KEYS = sorted({("method", key) for cls in METHOD_SETTINGS.values() for key in cls.model_fields})
TABLE_KEYS = sorted({("methods", name, key) for name, cls in METHOD_SETTINGS.items() for key in cls.model_fields})
PATHS = sorted(set(paths(BASE)) | set(METHOD_KEYS) | set(TABLE_KEYS) | {("seed",), ("data", "split_seed"), ("export", "opset"),
                                                      ("export", "name"), ("export", "root"),
                                                      ("export", "verify_batch_sizes"), ("bench", "batch_sizes"),
                                                      ("bench", "gate", "max_top1_drop", "int8")})


@dataclass
class Case:
    """A recipe file's text, `--set` overrides, and what an error line must name."""
    text: str
    overrides: tuple[str, ...]
    culprit: str | None  # a key path; None: the file's name


@st.composite
def mutated_recipes(draw) -> Case:
    """One key replaced, deleted or added; method names drawn from the registered ones."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    path = draw(st.sampled_from(PATHS))
    parent = data
    for key in path[:-1]:
        parent = parent.setdefault(key, {})
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    if kind == "replace":
        methods = st.sampled_from(sorted(METHOD_SETTINGS)) if path == ("method", "name") else values
        parent[path[-1]] = draw(st.one_of(values, methods))
    elif kind == "delete":
        parent.pop(path[-1], None)
    else:
        extra = draw(text.filter(lambda k: k not in parent))
        parent[extra] = draw(values)
        # the key as YAML reads it back (a quoted key folds line breaks such as U+0085 into spaces)
        path = path[:-1] + tuple(yaml.safe_load(yaml.safe_dump({extra: 0}, allow_unicode=True)))
    return Case(yaml.safe_dump(data, allow_unicode=True), (), ".".join(str(k) for k in path))


@st.composite
def overrides(draw) -> Case:
    """`--set key.path=value` with any value YAML can spell, including hostile numbers and aliases."""
    path = ".".join(draw(st.sampled_from(PATHS)))
    raw = draw(st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
                         st.sampled_from([".nan", ".inf", "-.inf", "-1", "4294967296", "[]", "[0]", "..", "../x", "/abs",
                                          "&a [*a]", "&a {k: *a}", "[" * 60 + "]" * 60, "dkd", "dist"]),
                         text))
    return Case(QUICKSTART.read_text(), (f"{path}={raw}",), path)


@st.composite
def hostile_yaml(draw) -> Case:
    """Whole files: alias bombs (fan-out ** levels values), recursive aliases, merge chains, deep nesting."""
    kind = draw(st.sampled_from(["bomb", "recursive", "merge", "deep_flow", "deep_block", "deep_alias"]))
    n, depth = draw(st.integers(2, 12)), draw(st.integers(1, 300))
    if kind == "bomb":
        lines = [f"l0: &l0 [{', '.join(['x'] * n)}]"]
        lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * n)}]" for i in range(1, draw(st.integers(1, 12)))]
        body = "\n".join(lines)
    elif kind == "recursive":
        body = draw(st.sampled_from(["x: &a [*a]", "x: &a {k: *a}", "x: &a [1, [2, {y: *a}]]", "train: &t {o: *t}"]))
    elif kind == "merge":
        lines = ["m0: &m0 {a: 1, b: 2}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: {i}}}" for i in range(1, n)]
        body = "\n".join(lines)
    elif kind == "deep_flow":
        body = "train: " + "[" * depth + "]" * depth
    elif kind == "deep_block":
        body = "train:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(depth))
    else:
        body = f"a: &a {'[' * (depth % 30)}{']' * (depth % 30)}\n" + "\n".join(
            f"b{i}: &b{i} [[[*{'a' if i == 0 else f'b{i - 1}'}]]]" for i in range(n))
    return Case(HEADER + body + "\n", (), None)


cases = st.one_of(mutated_recipes(), mutated_recipes(), overrides(), hostile_yaml())


def outcome(case: Case) -> str:
    """'ok', or what went wrong: a traceback, a wrong exit code, not one line, the culprit not named."""
    with tempfile.TemporaryDirectory() as folder:
        recipe_file = Path(folder) / "fuzzed.yaml"
        recipe_file.write_text(case.text, encoding="utf-8")
        args = ["recipe", "check", str(recipe_file), *[arg for o in case.overrides for arg in ("--set", o)]]
        result = CliRunner().invoke(cli, args)
    if (result.exception and not isinstance(result.exception, SystemExit)) or "Traceback" in result.output:
        return f"traceback: {type(result.exception).__name__}: {result.exception}"
    if result.exit_code not in (0, 2):
        return f"exit code {result.exit_code}: {result.output[-300:]}"
    if result.exit_code == 0:
        return "ok"
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    if len(errors) != 1:
        return f"not one error line: {result.output[-300:]}"
    named = [_printable(case.culprit, keep_newlines=False), "--set"] if case.culprit is not None else [str(recipe_file)]
    return "ok" if any(name in errors[0] for name in named) else f"culprit {named[0]!r} not named: {errors[0]}"


@settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_fuzzed_recipe_is_accepted_or_names_the_culprit(case, fault_trials):
    with fault_trials("recipe_fuzz").trial():
        assert outcome(case) == "ok", case


def test_empty_and_binary_files_name_the_file(tmp_path, fault_trials):
    trials = fault_trials("recipe_fuzz")
    for content in (b"", bytes(range(256)) * 4, b"\xef\xbb\xbf" + b"a: [" * 10_000):
        with trials.trial():
            assert outcome(Case(content.decode("latin-1"), (), None)) == "ok"
