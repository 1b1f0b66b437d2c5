"""The training stage: run directory contract, bad input, resume equivalence (two real processes: tests/reliability/test_ranks.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART, TINY, one_line_error
from kdtool import distill, load_recipe
from kdtool.checkpoint import read_state

FAST = TINY + ["train.epochs=3"]


def metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("epoch_seconds"), record.pop("train_seconds")
    return records


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    summary = distill(load_recipe(QUICKSTART, FAST), run_dir, progress=False)
    return run_dir, summary


def test_run_directory_contract(finished_run):
    run_dir, summary = finished_run
    assert load_recipe(run_dir / "recipe.yaml") == load_recipe(QUICKSTART, FAST)
    for out in (run_dir, run_dir / "teacher"):
        assert (out / "last").is_symlink() and (out / "best").is_symlink()
        assert (out / "last" / "model.safetensors").is_file() and (out / "last" / "state.json").is_file()
    state = read_state(run_dir / "last")
    assert state["epoch"] == 3 and state["finished"] and state["optimizer"]["param_groups"]
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"train_loss", "train_ce", "train_kl_orig", "train_kl_aug", "val_top1", "val_top5",
            "val_teacher_agreement", "teacher_val_top1"} <= set(records[-1])
    assert summary["student"]["val_top1"] == max(r["val_top1"] for r in records)
    assert json.loads((run_dir / "summary.json").read_text())["student"] == summary["student"]
    assert len(list((run_dir / "checkpoints").iterdir())) <= 2  # only what last/best point at


def test_teacher_trained_on_jda_views(finished_run, tmp_path):
    """teacher.augment.jda gives the teacher views (finding (b)); off by default, so finished_run's teacher saw none."""
    plain_dir, _ = finished_run
    run_dir = tmp_path / "jda-teacher"
    distill(load_recipe(QUICKSTART, [*FAST, "teacher.augment.jda.policy=rotation", "train.max_steps=1"]), run_dir,
            progress=False)
    plain, with_views = metrics(plain_dir / "teacher"), metrics(run_dir / "teacher")
    assert [r["step"] for r in plain] == [r["step"] for r in with_views]  # same batches and steps
    assert plain[0]["train_loss"] != with_views[0]["train_loss"]  # rotated views entered the loss
    assert load_recipe(plain_dir / "recipe.yaml").teacher.augment.jda.policy is None


def test_existing_run_dir_is_refused_and_resume_needs_a_checkpoint(cli_runner, tmp_path):
    run_dir = tmp_path / "runs" / "quickstart"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("keep me")
    args = sum([["--set", o] for o in FAST], [])
    line = one_line_error(cli_runner("distill", QUICKSTART, *args))
    assert "not a run directory made by kdtool" in line and (run_dir / "notes.txt").read_text() == "keep me"
    line = one_line_error(cli_runner("distill", QUICKSTART, *args, "--overwrite"))  # not ours: never deleted
    assert "not a run directory made by kdtool" in line and (run_dir / "notes.txt").read_text() == "keep me"
    assert "nothing to resume" in one_line_error(cli_runner("distill", QUICKSTART, "--resume", "--out", tmp_path / "empty"))


def test_run_refuses_an_existing_bundle_before_training(cli_runner, tmp_path):
    (tmp_path / "export" / "quickstart").mkdir(parents=True)
    line = one_line_error(cli_runner("run", QUICKSTART, *sum([["--set", o] for o in FAST], [])))
    assert "bundle directory export/quickstart exists" in line
    assert not (tmp_path / "runs").exists()


def test_resume_with_another_recipe_is_refused(cli_runner, finished_run):
    run_dir, _ = finished_run
    args = sum([["--set", o] for o in FAST], [])
    line = one_line_error(cli_runner("distill", QUICKSTART, *args, "--set", "train.epochs=5", "--resume", "--out", run_dir))
    assert "recipe differs" in line and "train.epochs" in line


def test_bad_input_in_the_recipe_values(cli_runner, tmp_path):
    base = sum([["--set", o] for o in FAST], [])
    line = one_line_error(cli_runner("distill", QUICKSTART, *base, "--set", "student.name=resnet9"))
    assert "unknown model 'resnet9'" in line and "resnet8x4" in line
    line = one_line_error(cli_runner("distill", QUICKSTART, *base, "--set", "data.name=cifar100",
                                     "--set", f"data.root={tmp_path / 'nope'}", "--out", tmp_path / "r2"))
    assert "dataset root not found" in line
    line = one_line_error(cli_runner("distill", QUICKSTART, *base, "--set", f"teacher.weights={tmp_path / 't.pt'}",
                                     "--out", tmp_path / "r3"))
    assert "checkpoint not found" in line


def test_nan_loss_stops_with_the_step_and_exit_1(cli_runner, tmp_path):
    result = cli_runner("distill", QUICKSTART, *sum([["--set", o] for o in FAST], []), "--set", "train.optimizer.lr=1e12",
                        "--set", "method.name=vanilla", "--out", tmp_path / "nan")
    line = one_line_error(result, code=1)
    assert "loss became nan" in line.lower() or "loss became inf" in line.lower()


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(finished_run, tmp_path, cli_runner):
    reference_dir, _ = finished_run
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "kdtool.cli", "distill", str(QUICKSTART), "--out", str(run_dir), "--no-progress"]
    args += sum([["--set", o] for o in FAST], [])
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "last").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / "last").exists(), f"the run never wrote a student checkpoint: {process.stderr.read()[-2000:]}"
    killed_at = read_state(run_dir / "last")["epoch"]
    result = cli_runner("distill", QUICKSTART, "--out", run_dir, "--resume", "--no-progress", *sum([["--set", o] for o in FAST], []))
    assert result.exit_code == 0, result.output
    assert metrics(run_dir) == metrics(reference_dir), f"killed after epoch {killed_at}"
    final, reference = load_file(str(run_dir / "last" / "model.safetensors")), load_file(str(reference_dir / "last" / "model.safetensors"))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_epoch_seed_stays_in_numpys_range():
    from accelerate.utils import set_seed

    from kdtool.train.setup import epoch_seed

    assert epoch_seed(42, 3) == 42_003  # small seeds: the seeds earlier runs used
    largest = epoch_seed(2**32 - 1, 199)
    assert 0 <= largest < 2**32
    set_seed(largest)  # numpy refuses seeds >= 2**32
