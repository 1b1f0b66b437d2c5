"""No user-supplied file runs code (issue 9): a pickle whose unpickling creates a marker file is planted in
every place kdtool reads a file a user hands it; the marker never appears, and each command ends in one
line with exit 2.

Places: the recipe; teacher and student weights (.pt in torch's zip format, a raw pickle .pth, a pickle
named .safetensors); a checkpoint directory (its weights, its state.json) given as weights, to export
and to --resume; CIFAR-100's python files; a bundle's manifest and its reference arrays; the INT8
calibration cache; TensorRT's timing cache and engines (skipped without TensorRT).
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error
from runs import MICRO, QUICKSTART, reference, set_args  # noqa: F401


class Payload:
    """Unpickling this calls Path.touch(marker): a loader that runs code from the file leaves the marker."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def plant(path: Path, marker: Path, form: str = "raw") -> Path:
    """Write the payload to `path`: a raw pickle, torch's zip format, or a numpy object array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "torch":
        torch.save({"conv.weight": Payload(marker)}, path)
    elif form == "numpy":
        np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps({"data": Payload(marker)}, protocol=2))
    return path


def test_the_payload_does_create_the_marker(tmp_path, fault_trials):
    """The check itself can fail: unpickling the planted file does run its code. (Not a trial: a counter
    with no trial keeps this test out of the family's count.)"""
    fault_trials("unpickle")
    marker = tmp_path / "PWNED"
    pickle.loads(plant(tmp_path / "x.pkl", marker).read_bytes())
    assert marker.exists()


@pytest.fixture
def marker(tmp_path):
    """Where the payload would leave its mark. Each test here is one trial of the 'unpickle' family."""
    return tmp_path / "PWNED"


def refused(result, marker: Path) -> str:
    """No code ran (no marker) and the command ended in one line with exit 2; returns the line."""
    assert not marker.exists(), "kdtool ran code from a user-supplied file"
    return one_line_error(result)


def poisoned_run(run_dir: Path, tmp_path: Path, file: str, marker: Path) -> Path:
    """A copy of `run_dir` with `file` of every student checkpoint (last, best, ...) replaced by the payload."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target, symlinks=True)
    for checkpoint in (target / "checkpoints").iterdir():
        plant(checkpoint / file, marker)
    return target


def test_recipe(marker, tmp_path, cli_runner):
    recipe = plant(tmp_path / "recipe.yaml", marker)
    assert str(recipe) in refused(cli_runner("recipe", "check", recipe), marker)


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("name, form", [("w.pt", "torch"), ("w.pth", "raw"), ("w.safetensors", "raw")])
def test_weights(side, name, form, marker, tmp_path, cli_runner):
    weights = plant(tmp_path / name, marker, form)
    line = refused(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", f"{side}.weights={weights}",
                             "--out", tmp_path / "out"), marker)
    assert str(weights) in line, line


def test_checkpoint_directory_as_weights(reference, marker, tmp_path, cli_runner):
    """A checkpoint directory named as weights (only its model.safetensors is read then)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree((reference[0] / "last").resolve(), checkpoint)
    plant(checkpoint / "model.safetensors", marker)
    line = refused(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", f"teacher.weights={checkpoint}",
                             "--out", tmp_path / "out"), marker)
    assert str(checkpoint) in line, line


def test_checkpoint_in_a_run_exported(reference, marker, tmp_path, cli_runner):
    run = poisoned_run(reference[0], tmp_path, "model.safetensors", marker)
    line = refused(cli_runner("export", run, "--out", tmp_path / "bundle", "--set", "export.int8.enabled=false"), marker)
    assert str(run) in line, line


@pytest.mark.parametrize("file", ["model.safetensors", "state.json"])
def test_checkpoint_in_a_run_resumed(file, reference, marker, tmp_path, cli_runner):
    run = poisoned_run(reference[0], tmp_path, file, marker)
    line = refused(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", "train.epochs=4",
                             "--out", run, "--resume"), marker)
    assert "last" in line or str(run) in line, line


def cifar100_files(root: Path) -> Path:
    """Two-image CIFAR-100 python files in the real layout (pickled dicts of str keys, uint8 rows)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1],
                                                  "coarse_labels": [0, 0], "filenames": ["a.png", "b.png"]}, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}, protocol=2))
    return root


@pytest.mark.parametrize("file", ["train", "test", "meta"])
def test_cifar100_files(file, marker, tmp_path, cli_runner):
    from kdtool.data import build_datasets
    from kdtool.recipe import DataConfig

    root = cifar100_files(tmp_path / "cifar")
    assert len(build_datasets(DataConfig(name="cifar100", root=str(root))).val) == 2  # the reader reaches each file
    planted = plant(root / "cifar-100-python" / file, marker)
    line = refused(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", "data.name=cifar100",
                             "--set", f"data.root={root}", "--out", tmp_path / "out"), marker)
    assert str(planted) in line or file in line, line


def test_bundle_manifest(marker, tmp_path, cli_runner):
    bundle = tmp_path / "bundle"
    plant(bundle / "manifest.json", marker)
    assert "manifest.json" in refused(cli_runner("bench", bundle), marker)


def _exported_bundle(reference, tmp_path) -> Path:
    from kdtool.export import export_bundle

    return export_bundle(reference[0], out=tmp_path / "bundle", overrides=["export.int8.enabled=false", "export.fp16=false"],
                         progress=False)


def test_bundle_reference_arrays(reference, marker, tmp_path, cli_runner):
    bundle = _exported_bundle(reference, tmp_path)
    arrays = sorted(p for p in bundle.rglob("*") if p.suffix in (".npy", ".npz", ".safetensors") and "reference" in str(p))
    assert arrays, f"the bundle {bundle} carries no reference arrays to plant into"
    for path in arrays:
        plant(path, marker, "numpy" if path.suffix == ".npy" else "raw")
    assert "reference" in refused(cli_runner("bench", bundle), marker)


def test_calibration_cache(marker, tmp_path):
    """The INT8 calibration cache (kdtool keeps it in a private scratch directory; ONNX Runtime reads it as JSON)."""
    from kdtool.export.onnx_export import export_onnx
    from kdtool.export.quantize import preprocess_for_quantization, quantize_qdq
    from kdtool.recipe import Int8Config

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 10))
    export_onnx(net, tmp_path / "m.onnx", image_size=8, opset=17)
    preprocess_for_quantization(tmp_path / "m.onnx", tmp_path / "prepared.onnx")
    cache = plant(tmp_path / "calibration.json", marker)
    with pytest.raises(Exception) as failure:
        quantize_qdq(tmp_path / "prepared.onnx", tmp_path / "q.onnx", calibration=np.zeros((4, 3, 8, 8), np.float32),
                     input_name="images", cfg=Int8Config(), reduce_range=False, calibration_cache=cache)
    assert not marker.exists() and not isinstance(failure.value, pickle.UnpicklingError)


def _tiny_onnx(tmp_path) -> Path:
    from kdtool.export.onnx_export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 10))
    export_onnx(net, tmp_path / "m.onnx", image_size=8, opset=17)
    return tmp_path / "m.onnx"


def test_tensorrt_timing_cache(marker, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: no timing cache is read here")
    from kdtool.errors import KdtoolError
    from kdtool.export.tensorrt import build_engine
    from kdtool.recipe import TensorRTConfig

    cache = plant(tmp_path / "timing.cache", marker)
    with pytest.raises((KdtoolError, RuntimeError, TypeError)):
        build_engine(_tiny_onnx(tmp_path), tmp_path / "m.engine", precision="fp16", input_name="images", image_size=8,
                     cfg=TensorRTConfig(), timing_cache=cache)
    assert not marker.exists()


def test_tensorrt_engine(marker, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: no engine is read here")
    from kdtool.bench.loading import Artefact
    from kdtool.bench.runtimes import RunnerOptions, TensorRTRunner
    from kdtool.errors import KdtoolError

    engine = plant(tmp_path / "m.engine", marker)
    with pytest.raises(KdtoolError, match="cannot deserialise"):
        TensorRTRunner(Artefact("trt_fp16", "fp16", "tensorrt", engine),
                       RunnerOptions("images", "logits", threads=1, include_copies=False, cuda_graphs=False))
    assert not marker.exists()
