"""Overhead of kdtool's timing harness against a bare ``session.run`` loop, in one run.

Both sides run the same ONNX Runtime CPU session (so the same threads and thread pool) on the
same preprocessed real images (the embedded digits validation set), for the same number of
iterations. The harness side is what `kdtool bench` does per case: `RUNTIMES["ort-cpu"]`'s
runner, inputs staged beforehand, `measure(...)` timing every call with perf_counter_ns. The bare
side is ``for x in inputs: session.run([out], {name: x})`` timed as a whole. Repeats are
interleaved, alternating which side goes first, so background load (other jobs on the machine)
falls on both; many short repeats keep each pair close in time. The figure is the median of the
per-repeat ratios harness / bare (target <= 1.03).

    python benchmarks/bench_overhead.py --model resnet8 --size 32 --batch 1 --iters 200 --repeats 61
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from kdtool.bench.bundle import Artefact
from kdtool.bench.runtimes import RUNTIMES, RunnerOptions
from kdtool.bench.timing import measure
from kdtool.data import build_datasets, normalize
from kdtool.models import build_model
from kdtool.recipe import DataConfig


def export_model(name: str, size: int, path: Path) -> None:
    model = build_model(name, num_classes=10).eval()
    warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False (as kdtool.export) is the "legacy" exporter
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["images"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def real_batches(size: int, batch: int, count: int) -> list[np.ndarray]:
    datasets = build_datasets(DataConfig(name="digits", image_size=size))
    images = torch.stack([datasets.val[i][0] for i in range(batch * count)])
    return list(normalize(images, datasets.info).numpy().reshape(count, batch, 3, size, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=61)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_model(args.model, args.size, path)
        options = RunnerOptions("images", "logits", args.threads, include_copies=True, cuda_graphs=False)
        runner = RUNTIMES["ort-cpu"].open(Artefact("fp32", "fp32", "onnx", path), options)
        staged = [runner.stage(batch) for batch in real_batches(args.size, args.batch, count=8)]
        session, feeds = runner.session, [{"images": x} for x in staged]

        def harness() -> float:
            start = time.perf_counter()
            measure(runner.run, staged, warmup=0, iters=args.iters)
            return time.perf_counter() - start

        def bare() -> float:
            count = len(feeds)
            start = time.perf_counter()
            for index in range(args.iters):
                session.run(["logits"], feeds[index % count])
            return time.perf_counter() - start

        harness(), bare()  # warm-up both paths
        ratios, harness_s, bare_s = [], [], []
        for repeat in range(args.repeats):
            if repeat % 2 == 0:
                h, b = harness(), bare()
            else:
                b, h = bare(), harness()
            harness_s.append(h)
            bare_s.append(b)
            ratios.append(h / b)

    per_call_us = statistics.median(bare_s) / args.iters * 1e6
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.iters} iterations x {args.repeats} interleaved repeats; bare session.run {per_call_us:.1f} us/call")
    print(f"harness median {statistics.median(harness_s):.3f} s, bare median {statistics.median(bare_s):.3f} s")
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"per-repeat ratios: quartiles {quartiles[0]:.3f} / {quartiles[1]:.3f} / {quartiles[2]:.3f}; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"harness / bare: median ratio {statistics.median(ratios):.4f} "
          f"({(statistics.median(ratios) - 1) * 100:+.2f} %; target within 3 %)")


if __name__ == "__main__":
    main()
