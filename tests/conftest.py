"""Shared fixtures: tiny recipes and helpers for running the CLI in-process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

# A quickstart small enough for unit tests: 16x16 digits, resnet8 on both sides, short epochs.
TINY = [
    "teacher.name=resnet8",
    "teacher.train.epochs=1",
    "train.epochs=2",
    "data.image_size=16",
    "data.train_fraction=0.25",
    "data.batch_size=32",
]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cli_runner(tmp_path, monkeypatch):
    """Run `kdtool ...` in-process with the temporary directory as the working directory."""
    from kdtool.cli import cli

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        args = [*args, "--no-progress"] if args and args[0] in ("distill", "run") else args
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def one_line_error(result, code: int = 2) -> str:
    """Assert a CLI result ends in a one-line error with `code` and shows no traceback; return the line.

    Output a command printed before the failure (epoch lines of a run that diverged) may precede it.
    """
    output = result.output.strip()
    assert result.exit_code == code, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    return errors[0]
