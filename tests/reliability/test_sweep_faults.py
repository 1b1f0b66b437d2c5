"""`kdtool sweep` under bad input: every fault is one line, exit 2, found before anything trains,
and a sweep never counts a run twice, shares a cell between values, or touches a directory that
is not a sweep of its own."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import one_line_error
from kdtool.recipe import dump_recipe, load_recipe
from kdtool.rundir import RUN_KIND, SWEEP_KIND, claim, is_owned
from kdtool.sweep import run_sweep
from runs import MICRO, QUICKSTART, set_args


def sweep_args(out, *grid: str, extra=()):
    return ["sweep", str(QUICKSTART), *[a for g in grid for a in ("--grid", g)], *set_args(MICRO), *extra,
            "--out", str(out), "--no-progress"]


def write_spec(path, **fields):
    spec = {"recipe": str(QUICKSTART), "out": str(path.parent / "out"), "set": {}, **fields}
    spec["set"] = {**{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in MICRO)}, **spec["set"]}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("grid", [
    ["method.name=kd,kd"],                 # the same value twice: one run counted twice, '± 0.00'
    ["augment.jda.p=0,0.0"],               # different text, the same recipe
    ["method.name=kd,ccd", "train.epochs=3,3"],
])
def test_a_value_given_twice_is_refused_before_training(tmp_path, cli_runner, grid):
    out = tmp_path / "sweep"
    line = one_line_error(cli_runner(*sweep_args(out, *grid, extra=["--seeds", "2"])))
    assert "twice" in line or "same" in line, line
    assert not out.exists()


def test_named_variants_with_the_same_overrides_are_refused(tmp_path, cli_runner):
    spec = write_spec(tmp_path / "twins.yaml", grid={"method": {"a": {"method.name": "kd"}, "b": {"method.name": "kd"}}})
    line = one_line_error(cli_runner("sweep", spec, "--no-progress"))
    assert "a and b are the same value" in line or "b and a are the same value" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("grid,culprit", [
    (["method.name=kd,nosuch"], "nosuch"),                                  # schema-valid string, unknown method
    (["student.name=resnet8,nosuchnet"], "nosuchnet"),                       # unknown model
    (["augment.jda.policy=digits,nosuchpolicy"], "nosuchpolicy"),           # unknown JDA policy
    (["data.batch_size=16,100000"], "data.batch_size"),                     # larger than the training set
    (["train.epochs=1,3", "train.schedule.milestones=[2]"], "train.epochs=1"),  # each value valid, one pair not
])
def test_an_invalid_cell_is_found_before_the_teacher_or_any_cell_trains(tmp_path, cli_runner, grid, culprit):
    out = tmp_path / "sweep"
    line = one_line_error(cli_runner(*sweep_args(out, *grid)))
    assert culprit in line, line
    assert not out.exists(), "something was trained or written before the bad cell was found"


def test_values_whose_names_sanitise_alike_get_their_own_cells(tmp_path):
    rows = run_sweep(QUICKSTART, {"export.root": ["a b", "a_b"]}, seeds=1, overrides=MICRO, out=tmp_path / "s",
                     progress=False)
    assert len({row["run_dir"] for row in rows}) == 2
    for row, root in zip(rows, ["a b", "a_b"]):
        assert yaml.safe_load(open(f"{row['run_dir']}/recipe.yaml"))["export"]["root"] == root


def test_sweep_onto_an_existing_run_directory_is_refused_untouched(tmp_path, cli_runner):
    run_dir = tmp_path / "run"
    claim(run_dir, RUN_KIND)
    saved = dump_recipe(load_recipe(QUICKSTART, [*MICRO, "train.epochs=5"]))
    (run_dir / "recipe.yaml").write_text(saved)
    line = one_line_error(cli_runner(*sweep_args(run_dir, "method.name=kd,ccd")))
    assert str(run_dir) in line and "sweep" in line, line
    assert (run_dir / "recipe.yaml").read_text() == saved
    assert is_owned(run_dir, RUN_KIND) and not (run_dir / "teacher").exists()


def test_sweep_onto_a_users_directory_is_refused_untouched(tmp_path, cli_runner):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    line = one_line_error(cli_runner(*sweep_args(mine, "method.name=kd,ccd")))
    assert str(mine) in line, line
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_finished_cell_from_another_recipe_is_not_reused(tmp_path, cli_runner):
    out = tmp_path / "sweep"
    first = cli_runner(*sweep_args(out, "method.name=kd"))
    assert first.exit_code == 0, first.output
    assert is_owned(out, SWEEP_KIND)
    line = one_line_error(cli_runner(*sweep_args(out, "method.name=kd", extra=["--set", "train.epochs=2"])))
    assert "method.name=kd,seed=0" in line and "another recipe" in line, line


@pytest.mark.parametrize("text,culprit", [
    ("recipe: x\nout: y\ngrid: {a: [1]}\ngrid: {b: [2]}\n", "given twice"),
    ("recipe: x\nout: y\nset: &s {train.epochs: 1}\ngrid: {method: {a: *s}}\n", "aliases"),
    ("recipe: x\nout: y\ngrid: {method.name: [kd]}\nseeds: 0\n", "seeds"),
    ("recipe: x\nout: y\ngrid: {method.name: [kd]}\nsweeps: 3\n", "sweeps"),
    ("recipe: x\nout: y\ngrid: {}\n", "grid"),
    ("recipe: x\nout: y\ngrid: 5\n", "grid"),
    ("- a\n- b\n", "mapping"),
    ("recipe: [unclosed\n", "YAML error at line 2"),
    ("name: quickstart\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n", "--grid"),
])
def test_a_malformed_spec_is_one_line_naming_it(tmp_path, cli_runner, text, culprit):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    line = one_line_error(cli_runner("sweep", spec, "--no-progress"))
    assert str(spec) in line and culprit in line, line


@pytest.mark.parametrize("fields,culprit", [
    ({"grid": {"method": {"x": {"seed": 3}}}}, "seed"),                    # the teacher fixes the seed
    ({"grid": {"method": {"x": {"data.val_fraction": 0.3}}}}, "data.val_fraction"),
    ({"grid": {"method": {"x": {}}}}, "x"),                                 # a variant that sets nothing
    ({"grid": {"method.name": ["kd"], "m": {"x": {"method.name": "ccd"}}}}, "method.name"),  # two axes, one key
    ({"grid": {"method.name": ["kd"], "m": {"x": {"method": {"name": "ccd"}}}}}, "method.name"),
    ({"grid": {"a/b": [1]}}, "a/b"),
    ({"recipe": "nosuch.yaml", "grid": {"method.name": ["kd"]}}, "nosuch.yaml"),
    ({"set": {"train.epochz": 3}, "grid": {"method.name": ["kd"]}}, "train.epochz"),
])
def test_a_spec_the_sweep_cannot_run_is_refused_before_training(tmp_path, cli_runner, fields, culprit):
    spec = write_spec(tmp_path / "spec.yaml", **fields)
    line = one_line_error(cli_runner("sweep", spec, "--no-progress"))
    assert culprit in line, line
    assert not (tmp_path / "out").exists()


def test_grid_on_a_spec_and_a_missing_spec_are_one_line(tmp_path, cli_runner):
    assert "not found" in one_line_error(cli_runner("sweep", tmp_path / "none.yaml", "--no-progress"))
    spec = write_spec(tmp_path / "spec.yaml", grid={"method.name": ["kd"]})
    line = one_line_error(cli_runner("sweep", spec, "--grid", "method.name=kd,ccd", "--no-progress"))
    assert str(spec) in line, json.dumps(line)
