"""INT8 (Q/DQ, ONNX Runtime CPU) vs FP32 latency, and ONNX Runtime FP32 vs PyTorch eager.

    python benchmarks/export_int8.py [RUN_DIR]

Models: the quickstart student (RUN_DIR, default: the most recent run under runs/), torchvision
mobilenet_v2 and resnet50 at 224x224 (random init; calibrated on real digits upsampled to 224 RGB,
so only speed is meaningful for them). Everything is measured in this one process, as ratios.
Targets: INT8 >= 1.3x FP32 at batch 32 on mobilenet_v2, >= 1.6x on resnet50; ORT FP32 >= 3x
PyTorch eager at batch 1 on mobilenet_v2.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from kdtool.export import export_bundle, find_latest_run, read_manifest
from kdtool.export.onnx_export import export_onnx, ort_session
from kdtool.export.quantize import choose_reduce_range, cpu_flags, preprocess_for_quantization, quantize_qdq
from kdtool.recipe import Int8Config

CALIBRATION_IMAGES = 32
TARGETS = {("mobilenet_v2", "int8"): 1.3, ("resnet50", "int8"): 1.6, ("mobilenet_v2", "ort_vs_eager"): 3.0}


def median_seconds(run, batch_size: int, budget_s: float = 4.0, min_iters: int = 3) -> float:
    """Median latency of `run()` after one warm-up, within roughly `budget_s`."""
    run()
    times, start = [], time.perf_counter()
    while len(times) < min_iters or (time.perf_counter() - start < budget_s and len(times) < 50):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def digits_224(count: int) -> np.ndarray:
    """Real digits, upsampled to 224x224 RGB, ImageNet-normalised."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:count]).float().div(16).unsqueeze(1)
    images = F.interpolate(images, size=224, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((images - mean) / std).numpy().astype(np.float32)


def onnx_pair(model: torch.nn.Module, workdir: Path, name: str, calibration: np.ndarray, image_size: int) -> tuple[Path, Path]:
    fp32, prepared, int8 = workdir / f"{name}.fp32.onnx", workdir / f"{name}.prep.onnx", workdir / f"{name}.int8.onnx"
    export_onnx(model, fp32, image_size=image_size, opset=17)
    preprocess_for_quantization(fp32, prepared)
    reduce_range, _ = choose_reduce_range(None, cpu_flags())
    quantize_qdq(prepared, int8, calibration=calibration, input_name="images",
                 cfg=Int8Config(calibration_images=len(calibration)), reduce_range=reduce_range)
    return fp32, int8


def ort_latency(path: Path, images: np.ndarray, batch_size: int) -> float:
    session = ort_session(path)
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    return median_seconds(lambda: session.run(None, {"images": batch}), batch_size)


def main(run_dir: Path | None) -> None:
    print(f"torch threads {torch.get_num_threads()}, CPU flags int8-relevant: "
          f"{sorted(cpu_flags() & {'avx2', 'avx512_vnni', 'avx_vnni', 'amx_int8'})}")
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        run_dir = run_dir or find_latest_run()
        bundle = export_bundle(run_dir, out=workdir / "quickstart", progress=False)
        manifest = read_manifest(bundle)
        accuracy = manifest["artefacts"]["int8"]["verification"]["accuracy"]
        size = manifest["preprocessing"]["image_size"]
        student_images = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
        cases = {"quickstart": (bundle / "model.fp32.onnx", bundle / "model.int8.onnx", student_images)}
        calibration = digits_224(CALIBRATION_IMAGES)
        for name in ("mobilenet_v2", "resnet50"):
            model = torchvision.models.get_model(name, weights=None).eval()
            cases[name] = (*onnx_pair(model, workdir, name, calibration, 224), calibration)
            if name == "mobilenet_v2":
                with torch.no_grad():
                    one = torch.from_numpy(calibration[:1])
                    eager = median_seconds(lambda: model(one), 1)
                ort_fp32 = ort_latency(cases[name][0], calibration, 1)
                results[(name, "ort_vs_eager")] = eager / ort_fp32
                print(f"{name}: batch 1 PyTorch eager {eager * 1e3:.2f} ms, ORT FP32 {ort_fp32 * 1e3:.2f} ms "
                      f"-> ORT {eager / ort_fp32:.2f}x")
        for name, (fp32, int8, images) in cases.items():
            for batch_size in (1, 32):
                t32, t8 = ort_latency(fp32, images, batch_size), ort_latency(int8, images, batch_size)
                print(f"{name:13s} batch {batch_size:2d}: FP32 {t32 * 1e3:8.2f} ms  INT8 {t8 * 1e3:8.2f} ms  "
                      f"INT8 speed-up {t32 / t8:.2f}x")
                if batch_size == 32:
                    results[(name, "int8")] = t32 / t8
    print(f"quickstart INT8 top-1 drop: {accuracy['top1_drop']:.2f} points "
          f"({accuracy['float_top1']:.2f}% -> {accuracy['int8_top1']:.2f}%)")
    for (name, what), target in TARGETS.items():
        ratio = results[(name, what)]
        print(f"target {name} {what}: {ratio:.2f}x (>= {target}x) {'met' if ratio >= target else 'MISSED'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
