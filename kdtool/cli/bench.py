"""`kdtool bench`."""
from __future__ import annotations

from pathlib import Path

import click

from kdtool.cli.common import debug_option, handle_errors


@click.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--batch", "batch_sizes", type=click.IntRange(min=1), multiple=True,
              help="Batch size to time (repeatable; default: the recipe's bench.batch_sizes).")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Timed iterations per case.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds per case instead of a fixed iteration count.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for ONNX Runtime (intra-op) and PyTorch.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Dataset root, read as the bundle's dataset kind: accuracy on its whole validation set, with the "
                   "teacher and float student of the training run, instead of the bundle's reference set. Refused "
                   "when its classes (count, names, order) are not the bundle's, and for datasets without a root "
                   "(the embedded digits).")
@click.option("--exclude-copies", is_flag=True, default=None,
              help="GPU runtimes: time inference only, inputs and outputs already on the device.")
@click.option("--cuda-graphs", is_flag=True, default=None, help="Native TensorRT: replay CUDA graphs.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@debug_option
@handle_errors
def bench(bundle, batch_sizes, iters, duration, threads, data, exclude_copies, cuda_graphs, progress):
    """Time every artefact of BUNDLE on every available runtime that serves its target and check its
    accuracy against the teacher and the float student, on the bundle's own reference set (no run or
    dataset needed). Writes report.{json,md,png} into BUNDLE; exits 1 when the recipe's accuracy gate
    (bench.gate) is missed, the teacher is at chance on the data, or an artefact cannot run on a runtime
    that serves it (a GPU runtime that did not get its provider included), and names what could not be
    checked here (a runtime not installed). BUNDLE defaults to the newest under export/.

    \b
    Examples:
        kdtool bench
        kdtool bench export/quickstart --batch 1 --batch 32 --iters 200 --threads 4
        kdtool bench export/imagenet_r50_mbv2 --data /datasets/imagenet --duration 5 --exclude-copies
    """
    from kdtool.bench import find_latest_bundle

    bench_and_print(bundle or find_latest_bundle(), batch_sizes=list(batch_sizes) or None, iters=iters,
                    duration=duration, threads=threads, data=str(data) if data else None,
                    include_copies=False if exclude_copies else None, cuda_graphs=cuda_graphs, progress=progress)


def bench_and_print(bundle: Path, **settings) -> dict:
    """Run the bench stage and print its tables, also when the gate fails (then re-raise)."""
    from kdtool.bench import GateFailed, print_report, run_bench

    try:
        report = run_bench(bundle, **settings)
    except GateFailed as failure:
        print_report(failure.report)
        raise
    print_report(report)
    return report
