"""Shared pieces of the fault tests: micro recipes, run comparison, kdtool as a user's subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdtool import build_datasets, build_loss, distill, load_recipe
from kdtool.augment import build_train_views
from kdtool.recipe import MethodConfig
from kdtool.train import Teacher, build_accelerator, fit

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

# Smaller than conftest.TINY: 8x8 digits and resnet8 on both sides, so a whole distill takes seconds
# and a test can afford several killed and resumed runs.
MICRO = [
    "teacher.name=resnet8",
    "teacher.train.epochs=1",
    "train.epochs=3",
    "data.image_size=8",
    "data.train_fraction=0.1",
    "data.val_fraction=0.05",
    "data.batch_size=16",
    # The thread count conftest gives in-process runs: results then match across processes, and
    # build_accelerator's torch.set_num_threads leaves the other tests' setting as it was.
    f"runtime.threads={torch.get_num_threads()}",
]
TIMING_FIELDS = ("train_seconds", "epoch_seconds")


def set_args(overrides) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def metrics(out_dir: Path) -> list[dict]:
    """metrics.jsonl without its timing fields."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in TIMING_FIELDS} for record in records]


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def same_run(run_dir: Path, reference_dir: Path) -> bool:
    """Same student and teacher metrics and final weights as the reference run."""
    return all(metrics(run_dir / sub) == metrics(reference_dir / sub) and same_weights(run_dir / sub / "last", reference_dir / sub / "last")
               for sub in (".", "teacher"))


def start_distill(run_dir: Path, *extra: str, preexec_fn=None) -> subprocess.Popen:
    """`kdtool distill` on the micro quickstart in a subprocess, as a user starts it."""
    args = [sys.executable, "-m", "kdtool.cli", "distill", str(QUICKSTART), "--out", str(run_dir), "--no-progress",
            *set_args(MICRO), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=preexec_fn)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists (the run got that far) or the process ends."""
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def one_line_error(stderr: str) -> str:
    """The single `Error: ...` line of a failed command's stderr (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def tiny_net(width: int) -> nn.Module:
    """A seeded few-layer net with dropout, so that an exact resume must also restore torch's global RNG."""
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def kd_loss():
    return build_loss(MethodConfig(name="kd"))[0]


def fit_micro(out_dir: Path, *, loss_fn=None, resume: bool = False, overrides=()):
    """`fit` a tiny student from a tiny teacher with KD + JDA on the micro digits, accumulating 2 batches per step."""
    recipe = load_recipe(QUICKSTART, MICRO + ["train.grad_accum=2", "augment.jda.p=0.5", *overrides])
    return fit(tiny_net(8), build_datasets(recipe.data), train_cfg=recipe.train, data_cfg=recipe.data,
               runtime=recipe.runtime, accelerator=build_accelerator(recipe.runtime), out_dir=out_dir, seed=0,
               loss_fn=loss_fn or kd_loss(), teacher=Teacher(tiny_net(12).eval()), train_views=build_train_views(recipe.augment.jda, recipe.seed),
               resume=resume, progress=False)


def on_call(loss_fn, at_call: int, action):
    """`loss_fn` that runs `action(result)` on its `at_call`-th call and returns what that gives."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        parts = loss_fn(*args, **kwargs)
        return action(parts) if calls[0] >= at_call else parts

    return wrapped


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted micro run, and how long its training took."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    started = time.perf_counter()
    distill(load_recipe(QUICKSTART, MICRO), run_dir, progress=False)
    return run_dir, time.perf_counter() - started
