"""The GPU suite: what no CPU test can see. Every test is marked `gpu` and skips with its reason where
CUDA (or ONNX Runtime's CUDA provider, or TensorRT) is absent; on a GPU machine run it with

    python -m pytest -m gpu tests/test_gpu.py -v -rs

- a CUDA distillation in bf16 with channels_last, with and without torch.compile;
- JDA on CUDA equal to JDA on the CPU, for every shipped policy;
- export, then bench on ONNX Runtime's CUDA provider, its rows saying the CUDA provider ran them; an
  artefact with an op the CUDA and TensorRT providers cannot take fails on them instead of falling back;
- where TensorRT imports: strongly typed engines built, benched, and the TensorRT INT8 engine's top-1
  within 0.5 points of the emulated Q/DQ model on the bundle's reference set.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdtool.augment import POLICIES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")
QUICK = ["teacher.name=resnet8", "teacher.train.epochs=1", "train.epochs=2", "data.image_size=16",
         "data.train_fraction=0.5", "data.batch_size=64", "runtime.cpu=false"]


def _tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("TensorRT is not installed (pip install 'kdtool[trt]')")
    from kdtool.export import require_tensorrt

    require_tensorrt()  # a supported version (>= 10.12)


def _ort_cuda_or_skip():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"ONNX Runtime has no CUDAExecutionProvider here ({', '.join(ort.get_available_providers())}); "
                    f"install onnxruntime-gpu")


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> Path:
    """A bf16, channels_last distillation on CUDA (the run export and bench use below)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to PyTorch")
    from kdtool.recipe import load_recipe
    from kdtool.train import distill

    run_dir = tmp_path_factory.mktemp("gpu") / "run"
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml",
                         [*QUICK, "runtime.mixed_precision=bf16", "runtime.channels_last=true"])
    distill(recipe, run_dir, progress=False)
    return run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_cuda_distillation_bf16_channels_last(compiled, tmp_path):
    from kdtool.recipe import load_recipe
    from kdtool.train import distill

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml",
                         [*QUICK, "runtime.mixed_precision=bf16", "runtime.channels_last=true",
                          f"runtime.compile={str(compiled).lower()}"])
    distill(recipe, tmp_path / "run", progress=False)
    records = [r for r in _records(tmp_path / "run") if r["stage"] == "student"]
    assert len(records) == 2 and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_top1"]) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns


@needs_cuda
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_jda_on_cuda_equals_jda_on_cpu(policy):
    from kdtool.augment import JointAugment

    augment = JointAugment(policy, p=0.5)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=generator, dtype=torch.uint8).float().div(255)
    params = augment.sample(len(images), generator)
    on_cpu = augment.apply(images, params)
    on_cuda = augment.apply(images.cuda(), type(params)(params.fire.cuda(), params.variant.cuda())).cpu()
    differing = (on_cpu != on_cuda).any(dim=(1, 2, 3))
    assert not differing.any(), f"{int(differing.sum())} of {len(images)} images differ between CUDA and CPU"


def test_export_then_bench_on_ort_cuda(cuda_run, tmp_path):
    _ort_cuda_or_skip()
    from kdtool.bench import run_bench
    from kdtool.export import export_bundle

    bundle = export_bundle(cuda_run, out=tmp_path / "bundle", progress=False)
    report = run_bench(bundle, batch_sizes=[1, 32], iters=20, progress=False)
    cuda_rows = {row["artefact"] for row in report["accuracy"] if row["runtime"] == "ort-cuda"}
    assert {"fp32", "fp16"} <= cuda_rows
    assert all(row["ran_on"] == "CUDAExecutionProvider" for row in report["accuracy"] + report["timing"]
               if row["runtime"] == "ort-cuda")
    assert {case["artefact"] for case in report["timing"] if case["runtime"] == "ort-cuda"} >= {"fp32", "fp16"}
    assert report["gate"]["passed"]


def test_tensorrt_engines_build_bench_and_int8_matches_emulation(cuda_run, tmp_path):
    _tensorrt_or_skip()
    from kdtool.bench import run_bench
    from kdtool.export import export_bundle

    bundle = export_bundle(cuda_run, out=tmp_path / "bundle", trt=True, progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["artefacts"]["trt_int8"]["engine"]["network"] == "strongly typed"
    report = run_bench(bundle, batch_sizes=[1, 8], iters=20, progress=False)
    rows = {(row["artefact"], row["runtime"]): row for row in report["accuracy"]}
    assert ("trt_fp16", "tensorrt") in rows and ("trt_int8", "tensorrt") in rows
    emulated = rows["int8_trt", "ort-emulated"]["top1"]
    engine = rows["trt_int8", "tensorrt"]["top1"]
    assert abs(engine - emulated) <= 0.5, f"TensorRT INT8 engine top-1 {engine:.2f} vs emulated Q/DQ {emulated:.2f}"
    assert {c["artefact"] for c in report["timing"] if c["runtime"] == "tensorrt"} == {"trt_fp16", "trt_int8"}
    assert report["gate"]["passed"] and not report["gate"]["not_checked"]
    assert np.isfinite([c["latency_ms"]["p50"] for c in report["timing"]]).all()


def with_cpu_only_op(model_path: Path) -> None:
    """Append ai.onnx.ml Binarizer (a CPU-only kernel in ONNX Runtime, no TensorRT layer) to the logits."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_raw" if name == output else name for name in node.output]
    model.graph.node.append(helper.make_node("Binarizer", [f"{output}_raw"], [output], domain="ai.onnx.ml",
                                             threshold=0.0))
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 1))
    onnx.checker.check_model(model)
    onnx.save(model, str(model_path))


def test_an_op_the_gpu_providers_cannot_take_fails_instead_of_falling_back(cuda_run, tmp_path):
    _ort_cuda_or_skip()
    from kdtool.bench import GateFailed, run_bench
    from kdtool.export import export_bundle
    from kdtool.io import sha256_file

    bundle = export_bundle(cuda_run, out=tmp_path / "bundle", overrides=["export.int8.enabled=false",
                                                                         "export.fp16=false"], progress=False)
    with_cpu_only_op(bundle / "model.fp32.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artefacts"]["fp32"].update(sha256=sha256_file(bundle / "model.fp32.onnx"),
                                         size_bytes=(bundle / "model.fp32.onnx").stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GateFailed, match="could not run") as failure:
        run_bench(bundle, batch_sizes=[1], iters=2, progress=False)
    report = failure.value.report
    gpu_runtimes = {r["name"] for r in report["runtimes"] if r["available"]} & {"ort-cuda", "ort-tensorrt"}
    failed_gpu = [f for f in report["failed"] if f["runtime"] in gpu_runtimes]
    assert {f["runtime"] for f in failed_gpu} == gpu_runtimes and "ort-cuda" in gpu_runtimes
    assert all("CPU fallback disabled" in f["reason"] for f in failed_gpu)
    assert not any(row["runtime"] in gpu_runtimes for row in report["timing"] + report["accuracy"])
    assert {row["ran_on"] for row in report["accuracy"] if row["runtime"] == "ort-cpu"} == {"CPUExecutionProvider"}
