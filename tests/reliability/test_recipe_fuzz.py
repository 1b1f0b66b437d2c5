"""Recipes fuzzed over the schema: never a traceback; exit 0, or exit 2 naming the key (or the file)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from figures import FAULTS
from kdtool.cli import cli

from kdtool.cli.common import _printable
from runs import QUICKSTART

BASE = yaml.safe_load(QUICKSTART.read_text())
FILE_TRIALS = 2  # the empty file and the binary file

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
scalars = st.one_of(st.none(), st.booleans(), text, st.integers(min_value=-10**30, max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
                      max_leaves=5)


def paths(node, prefix=()):
    """Every key path of the recipe, sections included."""
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from paths(value, prefix + (key,))


PATHS = sorted(paths(BASE))


@st.composite
def mutated_recipes(draw):
    """(recipe data, the dotted key the mutation touched): one key replaced, deleted or added."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    path = draw(st.sampled_from(PATHS))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    if kind == "replace":
        parent[path[-1]] = draw(values)
    elif kind == "delete":
        del parent[path[-1]]
    else:
        extra = draw(text.filter(lambda k: k not in parent))
        parent[extra] = draw(values)
        path = path[:-1] + (extra,)
    return data, ".".join(str(k) for k in path)


def check(recipe_file: Path) -> str:
    """`kdtool recipe check`: exit 0, or one `Error:` line (returned) with exit 2 and no traceback."""
    result = CliRunner().invoke(cli, ["recipe", "check", str(recipe_file)])
    assert result.exit_code in (0, 2) and not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        return ""
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@settings(max_examples=FAULTS["recipe_fuzz"].trials - FILE_TRIALS, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated_recipes())
def test_fuzzed_recipe_is_accepted_or_names_the_key(mutation):
    data, key = mutation
    with tempfile.TemporaryDirectory() as folder:
        recipe_file = Path(folder) / "fuzzed.yaml"
        recipe_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        line = check(recipe_file)
    assert not line or _printable(key, keep_newlines=False) in line, (key, line)


def test_empty_and_binary_files_name_the_file(tmp_path):
    empty, binary = tmp_path / "empty.yaml", tmp_path / "binary.yaml"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 4)
    for recipe_file in (empty, binary):
        line = check(recipe_file)
        assert str(recipe_file) in line, line
