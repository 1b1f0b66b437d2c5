"""INT8 vs FP32 on ONNX Runtime (CPU), the TensorRT INT8 artefact, and a peer runtime, in one process.

    python benchmarks/export_int8.py [RUN_DIR]

Models: the quickstart student (RUN_DIR, default: the most recent run under runs/), exported with
`kdtool export`; torchvision mobilenet_v2 and resnet50 at 224x224 (random init; calibrated on real digits
upsampled to 224 RGB, so only speed is meaningful for them), each quantised with both kdtool schemes:
the CPU artefact (U8S8, per-channel, reduce_range from this CPU's flags) and the TensorRT artefact
(symmetric INT8, zero points 0). The TensorRT artefact's accuracy is its emulated Q/DQ accuracy (what
TensorRT computes); its ONNX Runtime CPU speed is shown but is not its target. Peer: OpenVINO (optional
import; `pip install openvino` for this benchmark only) on the same CPU INT8 ONNX file at batch 32.
Everything is measured in this one process, as ratios; the load average is printed (a shared machine).
Targets: CPU INT8 >= 1.5x FP32 at batch 32 on mobilenet_v2, >= 1.8x on resnet50; ORT within 10 % of
OpenVINO on resnet50 INT8 at batch 32 (ORT / OpenVINO <= 1.10).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from kdtool.export import export_bundle, export_onnx, find_latest_run, ort_session, read_manifest, tensorrt_scheme
from kdtool.export.quantize import choose_reduce_range, cpu_flags, cpu_scheme, preprocess_for_quantization, quantize_qdq
from kdtool.recipe import Int8Config

CALIBRATION_IMAGES = 32
TARGETS = {("mobilenet_v2", "int8"): 1.5, ("resnet50", "int8"): 1.8}
PEER_TARGET = 1.10  # ORT / OpenVINO latency, resnet50 CPU INT8 at batch 32


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


def ort_latency(path: Path, images: np.ndarray, batch_size: int) -> float:
    session = ort_session(path, threads=torch.get_num_threads())  # the threads OpenVINO gets too
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    return median_seconds(lambda: session.run(None, {"images": batch}))


def openvino_latency(path: Path, images: np.ndarray, batch_size: int) -> float | None:
    """OpenVINO's CPU latency on the same ONNX file (None when openvino is not installed)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    return median_seconds(lambda: request.infer({0: batch}))


def quickstart(run_dir: Path, workdir: Path) -> None:
    bundle = export_bundle(run_dir, out=workdir / "quickstart", progress=False)
    for key, entry in read_manifest(bundle).artefacts.items():
        if entry.quantization is not None:
            accuracy = entry.verification.accuracy
            print(f"quickstart {key:8s} ({entry.target}, judged on {accuracy.numerics}): top-1 {accuracy.float_top1:.2f}% "
                  f"-> {accuracy.int8_top1:.2f}% (drop {accuracy.top1_drop:.2f} points on {accuracy.images} images)")


def main(run_dir: Path | None) -> None:
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
          f"(a shared machine); CPU flags int8-relevant: "
          f"{sorted(cpu_flags() & {'avx2', 'avx512_vnni', 'avx_vnni', 'amx_int8'})}")
    ratios: dict[tuple[str, str], float] = {}
    calibration = digits_224(CALIBRATION_IMAGES)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        quickstart(run_dir or find_latest_run(), workdir)
        for name in ("mobilenet_v2", "resnet50"):
            paths = onnx_models(torchvision.models.get_model(name, weights=None).eval(), workdir, name, calibration)
            for batch_size in (1, 32):
                t = {key: ort_latency(path, calibration, batch_size) for key, path in paths.items()}
                print(f"{name:12s} batch {batch_size:2d}: FP32 {t['fp32'] * 1e3:8.2f} ms  CPU INT8 {t['int8'] * 1e3:8.2f} ms "
                      f"({t['fp32'] / t['int8']:.2f}x)  TensorRT INT8 on ORT CPU (not its target) "
                      f"{t['int8_trt'] * 1e3:8.2f} ms ({t['fp32'] / t['int8_trt']:.2f}x)")
                if batch_size == 32:
                    ratios[(name, "int8")] = t["fp32"] / t["int8"]
                    peer = openvino_latency(paths["int8"], calibration, 32)
                    if peer is not None:
                        ratios[(name, "peer")] = t["int8"] / peer
                        print(f"{name:12s} batch 32: CPU INT8 on OpenVINO {peer * 1e3:8.2f} ms, "
                              f"ONNX Runtime / OpenVINO {t['int8'] / peer:.2f}")
    for (name, what), target in TARGETS.items():
        ratio = ratios[(name, what)]
        print(f"target {name} CPU INT8 / FP32 at batch 32: {ratio:.2f}x (>= {target}x) {'met' if ratio >= target else 'MISSED'}")
    if ("resnet50", "peer") in ratios:
        ratio = ratios[("resnet50", "peer")]
        print(f"target resnet50 ORT / OpenVINO INT8 at batch 32: {ratio:.2f} (<= {PEER_TARGET}) "
              f"{'met' if ratio <= PEER_TARGET else 'MISSED'}")
    else:
        print("peer: openvino is not installed (pip install openvino), no comparison")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
