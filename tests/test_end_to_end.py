"""End to end: the README's main command, and the shipped recipes on tiny data of their real formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO
from test_data import write_cifar100


@pytest.mark.slow
def test_quickstart_runs_the_whole_pipeline(cli_runner, tmp_path):
    result = cli_runner("run", REPO / "recipes" / "quickstart.yaml")
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["teacher"]["val_top1"] >= 97.0, summary["teacher"]
    assert summary["student"]["val_top1"] >= 95.0, summary["student"]
    bundle = tmp_path / "export" / "quickstart"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"fp32", "int8", "fp16"} <= set(manifest["artefacts"])
    assert manifest["artefacts"]["int8"]["verification"]["accuracy"]["top1_drop"] <= 1.0
    report = json.loads((bundle / "report.json").read_text())
    assert report["gate"]["passed"] and (bundle / "report.png").stat().st_size > 0


# One epoch cut to two steps: no learning-rate warm-up (a warm-up longer than train.epochs is refused).
TWO_STEPS = ["train.max_steps=2", "train.epochs=1", "train.schedule.warmup_epochs=0", "data.workers=0",
             "runtime.mixed_precision=no", "export.enabled=false"]


@pytest.mark.slow
def test_cifar100_recipe_two_steps_on_tiny_cifar_files(cli_runner, tmp_path, monkeypatch):
    write_cifar100(tmp_path / "cifar", n_train=40, n_test=20)
    monkeypatch.setenv("CIFAR100_ROOT", str(tmp_path / "cifar"))
    result = cli_runner("distill", REPO / "recipes" / "cifar100_resnet32x4_resnet8x4.yaml",
                        *sum([["--set", o] for o in TWO_STEPS + ["teacher.train.max_steps=2", "teacher.train.epochs=1",
                                                                 "teacher.train.schedule.milestones=[]",
                                                                 "train.schedule.milestones=[]",
                                                                 "data.batch_size=8", "data.eval_batch_size=20"]], []))
    assert result.exit_code == 0, result.output[-3000:]
    state = json.loads((tmp_path / "runs" / "cifar100_resnet32x4_resnet8x4" / "last" / "state.json").read_text())
    assert state["step"] == 2 and state["finished"]


@pytest.mark.slow
def test_imagenet_recipe_two_steps_on_a_tiny_imagefolder(cli_runner, tmp_path, monkeypatch):
    """1000 class folders of one small JPEG each (the IMAGENET1K_V2 head has 1000 outputs), weights from the hub cache."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(1000):
            folder = tmp_path / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(folder / "0.JPEG")
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path / "imagenet"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    result = cli_runner("distill", REPO / "recipes" / "imagenet_r50_mbv2.yaml",
                        *sum([["--set", o] for o in TWO_STEPS + ["data.image_size=32", "data.batch_size=4",
                                                                 "data.eval_batch_size=250"]], []))
    assert result.exit_code == 0, result.output[-3000:]
    run_dir = tmp_path / "runs" / "imagenet_r50_mbv2"
    state = json.loads((run_dir / "last" / "state.json").read_text())
    assert state["step"] == 2 and state["finished"] and not (run_dir / "teacher").exists()
