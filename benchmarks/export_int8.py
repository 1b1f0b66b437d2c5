"""INT8 vs FP32 on ONNX Runtime (CPU), the TensorRT INT8 artefact, and ONNX Runtime vs OpenVINO on the same
CPU INT8 file, in one process.

    python benchmarks/export_int8.py [RUN_DIR] [--budget SECONDS] [--no-quickstart]

Models: the quickstart student (RUN_DIR, default: the most recent run under runs/), exported with
`kdtool export`; torchvision mobilenet_v2 and resnet50 at 224x224 (random init; calibrated on real digits
upsampled to 224 RGB, so only speed is meaningful for them), each quantised with both kdtool schemes:
the CPU artefact (U8S8, per-channel, reduce_range from this CPU's flags) and the TensorRT artefact
(symmetric INT8, zero points 0). The TensorRT artefact's accuracy is its emulated Q/DQ accuracy (what
TensorRT computes); its ONNX Runtime CPU speed is shown but is not its target. ONNX Runtime and OpenVINO
(`pip install 'kdtool[openvino]'`) run the same CPU INT8 file at batch 1 and 32 through the runners
`kdtool bench` uses (kdtool.bench.runtimes: ort-cpu, openvino-cpu; same thread count), measured
alternately; the ratio ORT / OpenVINO > 1 means OpenVINO was faster. The CPU's int8-relevant flags are
printed, since which runtime wins depends on them (VNNI, AMX). Everything is measured in this one
process, as ratios; the load average is printed (a shared machine).
Targets: CPU INT8 >= 1.5x FP32 at batch 32 on mobilenet_v2, >= 1.8x on resnet50; ORT within 10 % of
OpenVINO on resnet50 INT8 at batch 32 (ORT / OpenVINO <= 1.10).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from kdtool.bench import RUNTIMES, Artefact, RunnerOptions
from kdtool.errors import KdtoolError
from kdtool.export import export_bundle, export_onnx, find_latest_run, read_manifest, tensorrt_scheme
from kdtool.export.quantize import choose_reduce_range, cpu_flags, cpu_scheme, preprocess_for_quantization, quantize_qdq
from kdtool.recipe import Int8Config

CALIBRATION_IMAGES = 32
TARGETS = {("mobilenet_v2", "int8"): 1.5, ("resnet50", "int8"): 1.8}
PEER_TARGET = 1.10  # ORT / OpenVINO latency, resnet50 CPU INT8 at batch 32
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


def median_seconds(run, budget_s: float = 4.0, min_iters: int = 3) -> float:
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


def onnx_models(model: torch.nn.Module, workdir: Path, name: str, calibration: np.ndarray) -> dict[str, Path]:
    """fp32, CPU INT8 and TensorRT INT8 ONNX files of `model`, made as `kdtool export` makes them."""
    paths = {key: workdir / f"{name}.{key}.onnx" for key in ("fp32", "prep", "int8", "int8_trt")}
    export_onnx(model, paths["fp32"], image_size=224, opset=17)
    preprocess_for_quantization(paths["fp32"], paths["prep"])
    cfg = Int8Config(calibration_images=len(calibration))
    for key, scheme in (("int8", cpu_scheme(*choose_reduce_range(None, cpu_flags()))), ("int8_trt", tensorrt_scheme())):
        quantize_qdq(paths["prep"], paths[key], calibration=calibration, input_name="images", cfg=cfg, scheme=scheme)
    return {key: path for key, path in paths.items() if key != "prep"}


def runtime_latency(runtime: str, path: Path, key: str, images: np.ndarray, batch_size: int, budget_s: float) -> float:
    """Median latency of `path` on a `kdtool bench` runtime (its runner, as bench opens it)."""
    options = RunnerOptions("images", "logits", threads=torch.get_num_threads(), include_copies=True, cuda_graphs=False)
    target = {"fp32": "any", "int8": "cpu", "int8_trt": "tensorrt"}[key]
    runner = RUNTIMES[runtime].open(Artefact(key, "int8" if key != "fp32" else "fp32", "onnx", path, target=target), options)
    batch = runner.stage(np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:]))))
    return median_seconds(lambda: runner.run(batch), budget_s)


def ort_vs_openvino(path: Path, images: np.ndarray, batch_size: int, budget_s: float) -> tuple[float, float] | None:
    """(ORT, OpenVINO) median latencies on the same CPU INT8 file, measured alternately; None without OpenVINO."""
    if RUNTIMES["openvino-cpu"].unavailable_reason():
        return None
    ort, openvino = [], []
    for _ in range(3):
        ort.append(runtime_latency("ort-cpu", path, "int8", images, batch_size, budget_s / 3))
        openvino.append(runtime_latency("openvino-cpu", path, "int8", images, batch_size, budget_s / 3))
    return float(np.median(ort)), float(np.median(openvino))


def quickstart(run_dir: Path, workdir: Path) -> None:
    bundle = export_bundle(run_dir, out=workdir / "quickstart", progress=False)
    for key, entry in read_manifest(bundle).artefacts.items():
        if entry.quantization is not None:
            accuracy = entry.verification.accuracy
            print(f"quickstart {key:8s} ({entry.target}, judged on {accuracy.numerics}): top-1 {accuracy.float_top1:.2f}% "
                  f"-> {accuracy.int8_top1:.2f}% (drop {accuracy.top1_drop:.2f} points on {accuracy.images} images)")


def main(run_dir: Path | None, budget_s: float, with_quickstart: bool, models: list[str]) -> None:
    flags = cpu_flags()
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
          f"(a shared machine); CPU flags: " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS))
    ratios: dict[tuple[str, str], float] = {}
    calibration = digits_224(CALIBRATION_IMAGES)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if with_quickstart:
            try:
                quickstart(run_dir or find_latest_run(), workdir)
            except KdtoolError as exc:
                print(f"quickstart: skipped ({exc})")
        for name in models:
            paths = onnx_models(torchvision.models.get_model(name, weights=None).eval(), workdir, name, calibration)
            for batch_size in (1, 32):
                t = {key: runtime_latency("ort-cpu", path, key, calibration, batch_size, budget_s)
                     for key, path in paths.items()}
                print(f"{name:12s} batch {batch_size:2d}: FP32 {t['fp32'] * 1e3:8.2f} ms  CPU INT8 {t['int8'] * 1e3:8.2f} ms "
                      f"({t['fp32'] / t['int8']:.2f}x)  TensorRT INT8 on ORT CPU (not its target) "
                      f"{t['int8_trt'] * 1e3:8.2f} ms ({t['fp32'] / t['int8_trt']:.2f}x)")
                if batch_size == 32:
                    ratios[(name, "int8")] = t["fp32"] / t["int8"]
                peer = ort_vs_openvino(paths["int8"], calibration, batch_size, budget_s)
                if peer is not None:
                    ratios[(name, f"peer{batch_size}")] = peer[0] / peer[1]
                    print(f"{name:12s} batch {batch_size:2d}: same CPU INT8 file, ONNX Runtime {peer[0] * 1e3:8.2f} ms, "
                          f"OpenVINO {peer[1] * 1e3:8.2f} ms, ORT / OpenVINO {peer[0] / peer[1]:.2f} "
                          f"({'OpenVINO' if peer[1] < peer[0] else 'ONNX Runtime'} faster)")
    for (name, what), target in TARGETS.items():
        if (name, what) in ratios:
            ratio = ratios[(name, what)]
            print(f"target {name} CPU INT8 / FP32 at batch 32: {ratio:.2f}x (>= {target}x) {'met' if ratio >= target else 'MISSED'}")
    if ("resnet50", "peer32") in ratios:
        ratio = ratios[("resnet50", "peer32")]
        print(f"target resnet50 ORT / OpenVINO INT8 at batch 32: {ratio:.2f} (<= {PEER_TARGET}) "
              f"{'met' if ratio <= PEER_TARGET else 'MISSED'}")
    elif RUNTIMES["openvino-cpu"].unavailable_reason():
        print(f"peer: {RUNTIMES['openvino-cpu'].unavailable_reason()}, no comparison")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="the quickstart run (default: the newest under runs/)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per case")
    parser.add_argument("--no-quickstart", dest="quickstart", action="store_false", help="skip the quickstart export")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    arguments = parser.parse_args()
    main(arguments.run_dir, arguments.budget, arguments.quickstart, arguments.models)
