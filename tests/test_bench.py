"""kdtool bench: statistics, the report files, the accuracy gate and bad bundles.

One tiny bundle is built once per module: a one-epoch quickstart run at 8x8 (the digits' native
size), its student exported to ONNX FP32 and to a static INT8 Q/DQ model calibrated on real images,
and a manifest with the keys the export stage writes. Only ONNX Runtime on the CPU and PyTorch
on the CPU run here; the GPU runtimes are reported as skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from onnx import numpy_helper

from kdtool.bench import find_latest_bundle, latency_stats, measure
from kdtool.bench.run import resolve_settings
from kdtool.cli import cli
from kdtool.errors import KdtoolError
from kdtool.recipe import BenchConfig

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["train.epochs=1", "teacher.train.epochs=1", "data.image_size=8", "teacher.name=resnet8",
            "data.batch_size=32", "train.schedule.warmup_epochs=0", "teacher.train.schedule.warmup_epochs=0",
            # A one-epoch 8x8 student loses up to ~2 points to INT8; the damaged model below loses ~70.
            "bench.gate.max_top1_drop={fp32: 0.5, fp16: 0.5, int8: 5.0}"]
FAST_BENCH = ["--batch", "1", "--batch", "8", "--iters", "3", "--threads", "1", "--no-progress"]


# ---------------------------------------------------------------- the bundle (what kdtool export writes)
def _calibration_reader(batches: list[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({input_name: batch} for batch in batches)

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


def make_bundle(root: Path) -> Path:
    """A run via the library, its student as FP32 ONNX and INT8 Q/DQ ONNX, and a manifest."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from kdtool.data import build_datasets, normalize
    from kdtool.recipe import load_recipe, save_recipe
    from kdtool.train import distill, load_student

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", TINY_RUN)
    run_dir = root / "runs" / "tiny"
    distill(recipe, run_dir, progress=False)
    datasets = build_datasets(recipe.data)
    info = datasets.info
    student = load_student(run_dir, recipe, info.num_classes)
    bundle = root / "export" / "tiny"
    bundle.mkdir(parents=True)
    size = recipe.data.image_size
    with warnings.catch_warnings():  # dynamo=False, as kdtool.export uses, warns that it is the legacy exporter
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(student, (torch.zeros(1, 3, size, size),), str(bundle / "model_fp32.onnx"),
                          input_names=["images"], output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    images = normalize(torch.stack([datasets.train[i][0] for i in range(128)]), info).numpy()
    quantize_static(str(bundle / "model_fp32.onnx"), str(bundle / "model_int8.onnx"),
                    _calibration_reader(np.split(images, 4), "images"), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    save_recipe(recipe, bundle / "recipe.yaml")
    manifest = {
        "artefacts": {
            "fp32": {"file": "model_fp32.onnx", "precision": "fp32", "kind": "onnx"},
            "int8": {"file": "model_int8.onnx", "precision": "int8", "kind": "onnx"},
        },
        "input": {"name": "images", "dtype": "float32", "shape": ["batch", 3, size, size]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", info.num_classes]},
        "preprocessing": {"image_size": size, "mean": list(info.mean), "std": list(info.std), "layout": "NCHW",
                          "class_names": list(info.class_names)},
        "provenance": {"run_dir": str(run_dir)},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bench"))


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    """A private copy of the bundle that a test may damage."""
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


def _bench(*args) -> Result:
    return CliRunner().invoke(cli, ["bench", *map(str, args), *FAST_BENCH])


# ---------------------------------------------------------------- statistics and the harness
def test_latency_stats_on_known_timings():
    durations_ns = [ms * 1_000_000 for ms in range(100, 0, -1)]  # 1..100 ms, in reverse order
    stats = latency_stats(durations_ns, batch_size=4)
    assert stats["iterations"] == 100
    assert stats["latency_ms"] == pytest.approx({"min": 1.0, "mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert stats["throughput_ips"] == pytest.approx(4 * 1000 / 50.5)


def test_latency_stats_single_timing():
    stats = latency_stats([2_500_000], batch_size=1)
    assert stats["latency_ms"] == pytest.approx({"min": 2.5, "mean": 2.5, "p50": 2.5, "p90": 2.5, "p99": 2.5})
    assert stats["throughput_ips"] == pytest.approx(400.0)


def test_measure_cycles_inputs_after_warmup():
    seen = []
    durations = measure(seen.append, ["a", "b", "c"], warmup=2, iters=5)
    assert len(durations) == 5 and all(d >= 0 for d in durations)
    assert seen == ["a", "b", "a", "b", "c", "a", "b"]
    assert len(measure(seen.append, ["a"], warmup=0, duration=0.01)) >= 1


def test_settings_precedence():
    bench = BenchConfig(batch_sizes=[8, 1], iters=50, duration=None, threads=3)
    settings = resolve_settings(bench)
    assert (settings.batch_sizes, settings.iters, settings.duration, settings.threads) == ((1, 8), 50, None, 3)
    assert resolve_settings(bench, duration=2.0).iters is None
    timed = resolve_settings(BenchConfig(duration=5.0))
    assert (timed.iters, timed.duration) == (None, 5.0)
    assert (resolve_settings(BenchConfig(duration=5.0), iters=7).iters, resolve_settings(bench, threads=1).threads) == (7, 1)
    assert resolve_settings(bench, include_copies=False).include_copies is False
    with pytest.raises(KdtoolError, match="not both"):
        resolve_settings(bench, iters=3, duration=1.0)


# ---------------------------------------------------------------- end to end
def test_good_bundle_passes_and_writes_report(bundle):
    result = _bench(bundle)
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output

    report = json.loads((bundle / "report.json").read_text())
    assert report["gate"]["passed"] and report["host"] and report["timestamp"]
    assert report["environment"]["cpu"]["logical_cores"] >= 1
    assert report["environment"]["versions"]["onnxruntime"]
    cases = {(c["artefact"], c["runtime"], c["batch_size"]) for c in report["timing"]}
    assert cases == {(a, r, b) for a, r in [("student", "pytorch-cpu"), ("fp32", "ort-cpu"), ("int8", "ort-cpu")]
                     for b in (1, 8)}
    assert all(c["iterations"] == 3 and c["threads"] == 1 for c in report["timing"])
    rows = {(row["artefact"], row["runtime"]): row for row in report["accuracy"]}
    assert set(rows) == {("teacher", "pytorch-cpu"), ("student", "pytorch-cpu"), ("fp32", "ort-cpu"), ("int8", "ort-cpu")}
    assert rows["fp32", "ort-cpu"]["student_agreement"] == pytest.approx(100.0)
    assert rows["fp32", "ort-cpu"]["top1_drop"] == pytest.approx(0.0)
    assert rows["student", "pytorch-cpu"]["top1"] > 50  # a trained student, so the gate test below means something

    markdown = (bundle / "report.md").read_text()
    for heading in ("## Timing", "## Accuracy", "## Gate", "## Runtimes"):
        assert heading in markdown
    assert "| fp32 | fp32 | ort-cpu | 1 |" in markdown
    assert (bundle / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_runtimes_are_listed_with_reasons(bundle):
    if not (bundle / "report.json").exists():
        assert _bench(bundle).exit_code == 0
    report = json.loads((bundle / "report.json").read_text())
    runtimes = {r["name"]: r for r in report["runtimes"]}
    assert set(runtimes) == {"pytorch-cpu", "pytorch-cuda", "ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"}
    for name, runtime in runtimes.items():
        assert runtime["available"] == (runtime["reason"] is None)
    assert not runtimes["ort-cuda"]["available"] and "CUDAExecutionProvider" in runtimes["ort-cuda"]["reason"]
    skipped = {(s["artefact"], s["runtime"]): s["reason"] for s in report["skipped"]}
    assert skipped["int8", "ort-cuda"] == runtimes["ort-cuda"]["reason"]


def _zero_int8_weights(model_path: Path) -> None:
    model = onnx.load(str(model_path))
    damaged = 0
    for initializer in model.graph.initializer:
        if initializer.data_type == onnx.TensorProto.INT8:
            initializer.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(initializer)), initializer.name))
            damaged += 1
    assert damaged > 0
    onnx.save(model, str(model_path))


def test_damaged_int8_fails_the_gate(bundle_copy):
    _zero_int8_weights(bundle_copy / "model_int8.onnx")
    result = _bench(bundle_copy)
    assert result.exit_code == 1, result.output
    assert "accuracy gate failed" in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("int8")]
    assert failed and "ort-cpu" in failed[0] and "top1_drop" in failed[0]
    assert not any(line.startswith("fp32 ") for line in result.output.splitlines())
    report = json.loads((bundle_copy / "report.json").read_text())  # written before failing
    assert not report["gate"]["passed"]
    assert {(f["artefact"], f["metric"]) for f in report["gate"]["failures"]} >= {("int8", "top1_drop")}


# ---------------------------------------------------------------- bad input: exit 2, one line naming the file
def test_missing_artefact_exits_2(bundle_copy):
    (bundle_copy / "model_int8.onnx").unlink()
    result = _bench(bundle_copy)
    assert result.exit_code == 2
    assert "model_int8.onnx" in result.output and "'int8'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("content", ["{not json", "[]", '{"input": {}}'])
def test_corrupt_manifest_exits_2(bundle_copy, content):
    (bundle_copy / "manifest.json").write_text(content)
    result = _bench(bundle_copy)
    assert result.exit_code == 2
    assert "manifest.json" in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_bundle_or_manifest_exits_2(tmp_path):
    result = _bench(tmp_path / "nowhere")
    assert result.exit_code == 2 and "nowhere" in result.output
    result = _bench(tmp_path)
    assert result.exit_code == 2 and "manifest.json" in result.output


def test_find_latest_bundle(tmp_path):
    with pytest.raises(KdtoolError, match="no bundle"):
        find_latest_bundle(tmp_path)
    for name, mtime in (("old", 1_000), ("new", 2_000), ("also_old", 1_500)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        os.utime(tmp_path / name / "manifest.json", (mtime, mtime))
    (tmp_path / "not_a_bundle").mkdir()
    assert find_latest_bundle(tmp_path) == tmp_path / "new"
