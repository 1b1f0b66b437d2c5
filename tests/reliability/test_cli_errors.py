"""Careless command lines: every Click parameter error, a recipe or spec path that is not a readable regular
file, and sweep arguments that cannot work are one line naming the culprit, exit 2, before anything is read,
trained or written."""
from __future__ import annotations

import errno
import os

import pytest
import yaml

from conftest import one_line_error
from runs import MICRO, QUICKSTART, set_args

SPEC = QUICKSTART.parent / "sweeps" / "a_rotation.yaml"

USAGE_ERRORS = [
    (["nosuch"], "No such command 'nosuch'"),
    (["--nosuch"], "No such option '--nosuch'"),
    (["recipe", "chek", QUICKSTART], "No such command 'chek'"),
    (["distill"], "Missing argument 'RECIPE'"),
    (["recipe", "check"], "Missing argument 'RECIPE'"),
    (["distill", QUICKSTART, "--nosuch"], "No such option '--nosuch'"),
    (["recipe", "check", QUICKSTART, "--set"], "'--set' requires an argument"),
    (["distill", QUICKSTART, "--progress=x"], "'--progress' does not take a value"),
    (["sweep", QUICKSTART, "--grid", "method.name=kd,ccd", "--seeds", "0"], "'--seeds': 0 is not in the range"),
    (["sweep", QUICKSTART, "--grid", "method.name=kd,ccd", "--seeds", "many"], "'--seeds': 'many' is not a valid integer"),
    (["sweep", SPEC, "--seeds", "-3"], "'--seeds'"),
    (["export", "--nosuch"], "No such option '--nosuch'"),
    (["bench", "--nosuch"], "No such option '--nosuch'"),
    (["distill", QUICKSTART, "extra"], "unexpected extra argument"),
]


def test_every_click_parameter_error_is_one_line(tmp_path, cli_runner, fault_trials):
    trials = fault_trials("cli_errors")
    for args, named in USAGE_ERRORS:
        with trials.trial():
            result = cli_runner(*args)
            line = one_line_error(result)
            assert named in line, (args, line)
            assert "Usage:" not in result.output and "Try '" not in result.output, result.output
            assert not any(tmp_path.iterdir()), f"{args} wrote {list(tmp_path.iterdir())}"


def test_help_is_still_help(cli_runner):
    for args in (["--help"], ["recipe"], ["sweep", "-h"]):
        result = cli_runner(*args)
        assert result.exit_code in (0, 2) and "Usage:" in result.output and "Error" not in result.output, args


def _not_a_file(kind: str, path):
    """Make `path` a `kind` of thing that is not a readable regular file."""
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # a reader that opened it would wait forever for a writer
    elif kind == "broken link":
        path.symlink_to(path.parent / "gone.yaml")
    return path


PATH_CASES = [("directory", "is not a regular file (it is a directory)"), ("fifo", "is not a regular file (it is a FIFO)"),
              ("broken link", "not found"), ("missing", "not found")]


@pytest.mark.parametrize("command", [["distill"], ["run"], ["recipe", "check"], ["sweep"], ["sweep-grid"]])
def test_a_recipe_path_that_is_not_a_readable_file_is_named_as_such(tmp_path, cli_runner, fault_trials, command):
    trials = fault_trials("cli_errors")
    for kind, named in PATH_CASES:
        with trials.trial():
            path = _not_a_file(kind, tmp_path / f"{kind.replace(' ', '_')}.yaml")
            args = ["sweep", path, "--grid", "method.name=kd,ccd"] if command == ["sweep-grid"] else [*command, path]
            line = one_line_error(cli_runner(*args))
            assert str(path) in line and named in line, line


def test_an_unreadable_recipe_is_named_not_readable(tmp_path, cli_runner, fault_trials, monkeypatch):
    """Mode 000; where the tests run as root (who reads any file), the open refused as the kernel would."""
    with fault_trials("cli_errors").trial():
        path = tmp_path / "secret.yaml"
        path.write_text(QUICKSTART.read_text())
        path.chmod(0)
        if os.geteuid() == 0:
            import kdtool.recipe

            def refuse(file, *args, **kwargs):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

            monkeypatch.setattr(kdtool.recipe, "open", refuse, raising=False)
        line = one_line_error(cli_runner("recipe", "check", path))
        assert str(path) in line and "not readable (Permission denied)" in line, line


def test_sweep_arguments_that_cannot_work_are_refused_before_anything(tmp_path, cli_runner, fault_trials):
    trials = fault_trials("cli_errors")
    out = tmp_path / "sweep"
    cases = [
        (["sweep", SPEC, "--grid", "method.name=kd,ccd"], f"{SPEC} is a sweep spec, not a recipe"),
        (["sweep", QUICKSTART, "--grid", "method.name=kd,ccd", "--seeds", str(10**15)], "must be 1..1000"),
        (["sweep", QUICKSTART, "--grid", "method.name=kd,ccd", "--seeds", str(10**400)], "must be 1..1000"),
        (["sweep", QUICKSTART, *[a for i in range(5) for a in ("--grid", f"k{i}.x={','.join(map(str, range(20)))}")]],
         "the sweep has 3200000 runs"),
        (["sweep", SPEC, "--seeds", "5000"], "must be 1..1000"),
    ]
    for args, named in cases:
        with trials.trial():
            line = one_line_error(cli_runner(*args, *set_args(MICRO), "--out", out, "--no-progress"))
            assert named in line and "--overwrite" not in line, line
            assert not out.exists()


def test_a_spec_whose_seeds_are_out_of_range_names_the_key(tmp_path, cli_runner, fault_trials):
    with fault_trials("cli_errors").trial():
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"recipe": str(QUICKSTART), "out": str(tmp_path / "out"), "seeds": 10**9,
                                        "grid": {"method.name": ["kd", "ccd"]}}))
        line = one_line_error(cli_runner("sweep", spec))
        assert "seeds" in line and str(spec) in line, line
        assert not (tmp_path / "out").exists()
