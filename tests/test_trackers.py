"""Experiment trackers through Accelerate: TensorBoard events written by a run, read back with TensorBoard's reader."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import QUICKSTART, REPO, TINY, one_line_error
from kdtool import distill, load_recipe
from kdtool.checkpoint import read_state

pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install 'kdtool[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 8x8 digits, three short student epochs; the thread count pinned so a subprocess computes what this process does.
TRACKED = TINY + ["data.image_size=8", "data.train_fraction=0.1", "data.batch_size=16", "train.epochs=3",
                  "runtime.log_with=[tensorboard]", "runtime.log_every=2", f"runtime.threads={torch.get_num_threads()}"]
TIMING = ("train_seconds", "epoch_seconds")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard shows for the run, as (step, value) lists."""
    events = EventAccumulator(str(run_dir / "logs" / "quickstart"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if not tag.endswith(TIMING)}


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    distill(load_recipe(QUICKSTART, TRACKED), run_dir, progress=False)
    return run_dir


def test_tensorboard_gets_steps_epochs_and_the_recipe(tracked_run):
    series = scalars(tracked_run)
    teacher_steps = read_state(tracked_run / "teacher" / "last")["step"]
    student_steps = read_state(tracked_run / "last")["step"]
    # Loss parts and learning rate every 2 optimizer steps; the student's steps follow the teacher's.
    assert [s for s, _ in series["teacher/step/lr"]] == list(range(2, teacher_steps + 1, 2))
    for part in ("loss", "ce", "kl_orig", "kl_aug", "lr"):
        assert [s for s, _ in series[f"student/step/{part}"]] == [teacher_steps + s for s in range(2, student_steps + 1, 2)]
    # Each epoch's record at the step it ended, with metrics.jsonl's values.
    for stage, out, offset in (("teacher", tracked_run / "teacher", 0), ("student", tracked_run, teacher_steps)):
        for key in ("train_loss", "val_top1", "lr"):
            assert series[f"{stage}/epoch/{key}"] == [(offset + r["step"], pytest.approx(r[key], rel=1e-6))
                                                      for r in records(out)], (stage, key)
    assert [v for _, v in series["student/epoch/teacher_val_top1"]] == pytest.approx(
        [r["teacher_val_top1"] for r in records(tracked_run)])
    config = yaml.safe_load(next((tracked_run / "logs" / "quickstart").glob("*/hparams.yml")).read_text())
    assert config["train.epochs"] == 3 and config["data.image_size"] == 8 and config["runtime.log_with"] == '["tensorboard"]'


def test_a_killed_and_resumed_run_continues_its_curves(tracked_run, tmp_path, cli_runner):
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "kdtool.cli", "distill", str(QUICKSTART), "--out", str(run_dir), "--no-progress",
            *[arg for override in TRACKED for arg in ("--set", override)]]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not (run_dir / "last").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # until the student's first checkpoint: what it logs next is past that checkpoint
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert (run_dir / "last").exists(), "the run never wrote a student checkpoint"
    # TensorBoard orders event files by their names, which start with the second they were opened.
    time.sleep(1.1)
    result = cli_runner("distill", QUICKSTART, "--out", run_dir, "--resume", *[a for o in TRACKED for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    assert scalars(run_dir) == scalars(tracked_run)


def test_a_missing_tracker_is_one_line_before_anything_runs(cli_runner, tmp_path, monkeypatch):
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    line = one_line_error(cli_runner("distill", QUICKSTART, "--out", tmp_path / "run", *[a for o in TRACKED for a in ("--set", o)]))
    assert "tensorboard tracker is not installed" in line and "pip install 'kdtool[tensorboard]'" in line, line
    assert not (tmp_path / "run").exists()
