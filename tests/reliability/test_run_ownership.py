"""kdtool replaces or deletes only what it made, and never saves or resumes into a state it cannot vouch for.

Each test plants a user's data where a careless run would destroy it, then checks that the data is
untouched and the refusal is one line with exit 2 (or 1 for a diverged model).
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from conftest import one_line_error
from kdtool.checkpoint import read_state, save_checkpoint
from kdtool.errors import CheckFailed
from kdtool.rundir import MARKER_FILE, clear_run
from runs import MICRO, QUICKSTART, fit_micro, kd_loss, on_call, reference, set_args  # noqa: F401


def plant(directory, marker: bool = True):
    """A user's file (and, to show the marker alone is not enough, kdtool's run marker) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thesis.tex").write_text("years of work")
    if marker:
        (directory / MARKER_FILE).write_text(json.dumps({"kind": "run", "created": "2020-01-01"}))
    return directory / "thesis.tex"


def copy_run(run_dir, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(run_dir, target, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    return target


def distill(cli_runner, out, *extra):
    return cli_runner("distill", QUICKSTART, "--out", out, *set_args(MICRO), *extra)


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "not_kdtool", "symlinked_run"])
def test_overwrite_refuses_what_kdtool_did_not_make(where, cli_runner, tmp_path, monkeypatch):
    work = tmp_path / "work" / "checkout"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if where == "cwd":
        out, precious = ".", plant(work)
    elif where == "parent":
        out, precious = "..", plant(work.parent)
    elif where == "home":
        out, precious = str(tmp_path / "home"), plant(tmp_path / "home")
    elif where == "not_kdtool":
        out, precious = "photos", plant(work / "photos", marker=False)
    else:  # a link to a real kdtool run: replacing it would act on the target
        precious = plant(tmp_path / "elsewhere" / "run")
        (work / "runs").mkdir()
        os.symlink(tmp_path / "elsewhere" / "run", work / "runs" / "linked")
        out = "runs/linked"
    line = one_line_error(distill(cli_runner, out, "--overwrite"))
    assert "refusing" in line and out in line, line
    assert precious.read_text() == "years of work"
    assert (precious.parent / MARKER_FILE).exists() == (where != "not_kdtool")


def test_checkpoint_rotation_never_follows_a_symlinked_checkpoints_dir(tmp_path):
    shared = tmp_path / "shared_disk"
    for folder in ("photos", "epoch-0001", "other-project"):  # an unrelated folder may even look like a checkpoint
        plant(shared / folder, marker=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(shared, run_dir / "checkpoints")
    weights = {"w": torch.ones(2)}
    for epoch in (2, 3, 4):  # every save rotates: only what last/best point at is kept
        save_checkpoint(run_dir, model_state=weights, optimizer_state={"state": {}, "param_groups": []},
                        scheduler_state={}, state={"epoch": epoch}, is_best=epoch == 2)
    assert read_state(run_dir / "last")["epoch"] == 4 and read_state(run_dir / "best")["epoch"] == 2
    for folder in ("photos", "epoch-0001", "other-project"):
        assert (shared / folder / "thesis.tex").read_text() == "years of work", folder

    clear_run(run_dir)  # what --overwrite does to an owned run: the link goes, the shared disk stays
    assert not (run_dir / "checkpoints").exists() and (shared / "photos" / "thesis.tex").exists()


def test_resume_with_a_dangling_last_stops_and_keeps_best(reference, cli_runner, tmp_path):
    reference_dir, _ = reference
    for sub in (".", "teacher"):
        run_dir = copy_run(reference_dir, tmp_path, f"dangling-{sub.strip('.') or 'student'}")
        (run_dir / sub / "last").unlink()
        os.symlink("checkpoints/epoch-0099", run_dir / sub / "last")  # its checkpoint is gone
        best_target = os.readlink(run_dir / sub / "best")
        line = one_line_error(distill(cli_runner, run_dir, "--resume"))
        assert str(run_dir / sub / "last") in line and "broken link" in line, line
        assert os.readlink(run_dir / sub / "best") == best_target and (run_dir / sub / "best" / "model.safetensors").is_file()


def test_a_run_without_last_never_replaces_its_best(reference, cli_runner, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    best_target = os.readlink(run_dir / "best")
    best_bytes = (run_dir / "best" / "model.safetensors").read_bytes()
    (run_dir / "last").unlink()  # e.g. removed by hand; the run cannot be resumed, and best is not this new run's
    (run_dir / "summary.json").unlink()
    line = one_line_error(distill(cli_runner, run_dir, "--resume"))
    assert str(run_dir / "best") in line and "--overwrite" in line, line
    assert os.readlink(run_dir / "best") == best_target
    assert (run_dir / "best" / "model.safetensors").read_bytes() == best_bytes


def test_max_steps_never_saves_a_diverged_model(tmp_path):
    """train.max_steps ending an epoch between loss checks: the save itself checks the weights."""
    out = tmp_path / "nan-at-the-last-step"
    poison = on_call(kd_loss(), 6, lambda parts: {**parts, "loss": parts["loss"] * math.nan})  # step 3 = batch 6
    with pytest.raises(CheckFailed) as diverged:
        fit_micro(out, loss_fn=poison, overrides=["train.max_steps=3"])
    assert "epoch 1, step 3" in str(diverged.value) and "no checkpoint was written" in str(diverged.value)
    assert not (out / "best").exists() and not (out / "last").exists()


def test_run_resume_never_replaces_a_bundle(cli_runner, tmp_path):
    exportable = ["export.int8.calibration_images=16", "bench.enabled=false"]  # what the micro data allows
    assert distill(cli_runner, tmp_path / "run", *set_args(exportable)).exit_code == 0
    bundle = tmp_path / "export" / "quickstart"  # made from another run
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text(json.dumps({"provenance": {"run": "another run"}}))
    result = cli_runner("run", QUICKSTART, "--out", tmp_path / "run", "--resume", *set_args(MICRO + exportable))
    line = one_line_error(result)
    assert "bundle directory export/quickstart exists" in line and "--overwrite" in line, line
    assert json.loads((bundle / "manifest.json").read_text()) == {"provenance": {"run": "another run"}}


@pytest.mark.parametrize("seed, why", [("-1", "greater than or equal to 0"), ("4294967296", "less than or equal to 4294967295"),
                                       ("9" * 60, "less than or equal to 4294967295"), ("1e23", "not a valid integer"),
                                       ("seven", "not a valid integer")])
def test_bad_seed_is_one_line_naming_the_option(seed, why, cli_runner, tmp_path):
    line = one_line_error(distill(cli_runner, tmp_path / "r", "--seed", seed))
    assert line.startswith("Error: --seed:") and why in line and len(line) < 120, line
    assert not (tmp_path / "r").exists()
