"""Overhead of kdtool's timing harness against a bare ``session.run`` loop, from a portable bundle, in one run.

The bundle is read as `kdtool bench` reads it (`load_bundle`: the manifest through its schema, every
artefact's sha256) and its reference set supplies the inputs (uint8 images preprocessed as the manifest
says), so the figure is what bench costs on a machine that has only the bundle. Both sides run the same
ONNX Runtime CPU session (the runner `RUNTIMES["ort-cpu"]` opens for the artefact), on the same
preprocessed reference images, for the same number of iterations. The harness side is what `kdtool
bench` does per case: inputs staged beforehand, `measure(...)` timing every call with perf_counter_ns.
The bare side is ``for x in inputs: session.run([out], {name: x})`` timed as a whole. Repeats are
interleaved, alternating which side goes first, so background load (other jobs on the machine) falls on
both; many short repeats keep each pair close in time. The figure is the median of the per-repeat
ratios harness / bare (target <= 1.03).

    python benchmarks/bench_overhead.py export/quickstart --artefact fp32 --batch 1 --iters 200 --repeats 61
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from kdtool.bench import RUNTIMES, RunnerOptions, load_bundle, measure
from kdtool.bundle import read_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle written by `kdtool export`")
    parser.add_argument("--artefact", default="fp32", help="an ONNX artefact of the bundle run on ort-cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=61)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    reference = read_reference(bundle.directory, manifest)
    artefact = next(a for a in bundle.artefacts if a.key == args.artefact)
    options = RunnerOptions(bundle.input_name, bundle.output_name, args.threads, include_copies=True, cuda_graphs=False,
                            input_shape=tuple(manifest.input.shape[1:]), num_classes=manifest.model.num_classes)
    runner = RUNTIMES["ort-cpu"].open(artefact, options)
    count = min(8, len(reference.labels) // args.batch)
    staged = [runner.stage(reference.preprocessed(i * args.batch, (i + 1) * args.batch, manifest.preprocessing))
              for i in range(count)]
    session, feeds = runner.session, [{bundle.input_name: x} for x in staged]

    def harness() -> float:
        start = time.perf_counter()
        measure(runner.run, staged, warmup=0, iters=args.iters)
        return time.perf_counter() - start

    def bare() -> float:
        count = len(feeds)
        start = time.perf_counter()
        for index in range(args.iters):
            session.run([bundle.output_name], feeds[index % count])
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
    print(f"{args.bundle} {args.artefact} ({manifest.model.name}, {manifest.preprocessing.image_size} px), "
          f"reference set of {len(reference.labels)} images; batch {args.batch}, {args.threads} thread(s), "
          f"{args.iters} iterations x {args.repeats} interleaved repeats; bare session.run {per_call_us:.1f} us/call")
    print(f"harness median {statistics.median(harness_s):.3f} s, bare median {statistics.median(bare_s):.3f} s")
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"per-repeat ratios: quartiles {quartiles[0]:.3f} / {quartiles[1]:.3f} / {quartiles[2]:.3f}; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"harness / bare: median ratio {statistics.median(ratios):.4f} "
          f"({(statistics.median(ratios) - 1) * 100:+.2f} %; target within 3 %)")


if __name__ == "__main__":
    main()
