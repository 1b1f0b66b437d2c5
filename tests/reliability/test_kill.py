"""Training killed, signalled, diverging or doubled, run as a user runs it: `kdtool distill` in a subprocess."""
from __future__ import annotations

import math
import os
import random
import signal
import time

import pytest
import torch

from conftest import one_line_error as cli_one_line_error
from kdtool.checkpoint import read_state
from kdtool.errors import CheckFailed
from kdtool.models import read_state_dict
from runs import (MICRO, QUICKSTART, fit_micro, kd_loss, one_line_error, on_call, reference, same_run, set_args,  # noqa: F401
                  start_distill, wait_for)

SIGKILLS = 6  # kills at seeded random moments


def assert_checkpoints_valid(run_dir):
    for out in (run_dir, run_dir / "teacher"):
        if (out / "last").exists():
            read_state(out / "last")
            assert all(torch.isfinite(t).all() for t in read_state_dict(out / "last").values())


def leave_half_written_checkpoint(run_dir):
    """What a kill inside `save_checkpoint` leaves: a staging directory and a link not yet renamed."""
    for out in (run_dir, run_dir / "teacher"):
        if (out / "checkpoints").is_dir():
            partial = out / "checkpoints" / ".epoch-0099.kill.partial"
            partial.mkdir()
            (partial / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
            (out / ".last.tmp-link").unlink(missing_ok=True)
            os.symlink("checkpoints/epoch-0099", out / ".last.tmp-link")


def resume(cli_runner, run_dir):
    """`--resume`, or a fresh `--overwrite` run where the kill came before any checkpoint (as a user would)."""
    result = cli_runner("distill", QUICKSTART, "--out", run_dir, "--resume", *set_args(MICRO))
    if result.exit_code == 2 and "nothing to resume" in result.output:
        result = cli_runner("distill", QUICKSTART, "--out", run_dir, "--overwrite", *set_args(MICRO))
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(reference, tmp_path, cli_runner, fault_trials):
    reference_dir, seconds = reference
    trials = fault_trials("sigkill")
    for trial in range(SIGKILLS):
        with trials.trial():
            run_dir = tmp_path / f"trial-{trial}"
            process = start_distill(run_dir)
            wait_for(run_dir / "recipe.yaml", process)  # imports done, training starts
            time.sleep(random.Random(trial).uniform(0, seconds))
            process.kill()
            process.communicate()
            where = {out.name: read_state(out / "last").get("epoch") if (out / "last").exists() else None
                     for out in (run_dir / "teacher", run_dir)}
            assert_checkpoints_valid(run_dir)
            leave_half_written_checkpoint(run_dir)
            resume(cli_runner, run_dir)
            assert same_run(run_dir, reference_dir), f"trial {trial}, killed with checkpoints {where}"


@pytest.mark.slow
def test_sigint_and_sigterm_stop_cleanly(reference, tmp_path, cli_runner, fault_trials):
    reference_dir, _ = reference
    trials = fault_trials("signal_cli")
    for signum in (signal.SIGINT, signal.SIGTERM):
        with trials.trial():
            run_dir = tmp_path / signum.name
            process = start_distill(run_dir)
            wait_for(run_dir / "last", process)  # the student is training
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 128 + signum, stderr
            line = one_line_error(stderr)
            assert f"stopped by {signum.name}" in line and "saved" in line and "--resume" in line, line
            assert_checkpoints_valid(run_dir)
            resume(cli_runner, run_dir)
            assert same_run(run_dir, reference_dir), signum.name


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, cli_runner, fault_trials):
    trials = fault_trials("nan")
    with trials.trial():
        result = cli_runner("distill", QUICKSTART, "--out", tmp_path / "absurd", *set_args(MICRO),
                            "--set", "train.optimizer.lr=1e12")
        line = cli_one_line_error(result, code=1)
        assert ("loss became nan" in line or "loss became inf" in line) and "step" in line, line
        assert read_state(tmp_path / "absurd" / "teacher" / "last")["finished"]  # the teacher's run is untouched
        assert_checkpoints_valid(tmp_path / "absurd")
    with trials.trial():
        out = tmp_path / "nan-in-epoch-2"
        with pytest.raises(CheckFailed) as diverged:
            fit_micro(out, loss_fn=on_call(kd_loss(), 12, lambda parts: {**parts, "loss": parts["loss"] * math.nan}))
        assert "epoch 2" in str(diverged.value) and f"the last good checkpoint is {out / 'last'}" in str(diverged.value)
        assert read_state(out / "last")["epoch"] == 1
        assert_checkpoints_valid(out)


def test_second_process_on_a_run_dir_is_refused(reference, tmp_path, cli_runner):
    reference_dir, _ = reference
    run_dir = tmp_path / "shared"
    first = start_distill(run_dir)
    wait_for(run_dir / "recipe.yaml", first)
    for extra in ([], ["--resume"], ["--overwrite"]):
        line = cli_one_line_error(cli_runner("distill", QUICKSTART, "--out", run_dir, *set_args(MICRO), *extra))
        assert "in use by another kdtool process" in line, line
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert same_run(run_dir, reference_dir)
