"""`kdtool export`: a run's best student -> a verified deploy bundle."""
from __future__ import annotations

from pathlib import Path

import click

from kdtool.cli.common import debug_option, handle_errors, set_option


@click.command()
@click.argument("run_dir", metavar="[RUN]", required=False, type=click.Path(path_type=Path))
@click.option("--trt", is_flag=True, help="Also build TensorRT FP16/INT8 engines (needs tensorrt and an NVIDIA GPU).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle directory (default: <export.root>/<export.name or recipe name>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@click.option("--rebuild", is_flag=True, help="Rebuild the TensorRT engines of an existing bundle for this machine.")
@set_option
@click.option("--progress/--no-progress", default=True, help="Report each step on stderr.")
@debug_option
@handle_errors
def export(run_dir, trt, out, overwrite, rebuild, overrides, progress):
    """Export the best student of RUN (default: the most recent run under runs/) to a deploy bundle:
    ONNX FP32 checked against PyTorch, INT8 Q/DQ calibrated on training images (with accuracy-aware
    fallback), FP16, and TensorRT engines with --trt. --set overrides the run recipe's export section.

    \b
    Examples:
        kdtool export
        kdtool export runs/quickstart --out /tmp/bundle --overwrite
        kdtool export --set export.int8.method=entropy --set export.int8.max_top1_drop=0.5
        kdtool export runs/imagenet_r50_mbv2 --trt
        kdtool export --trt --rebuild          # engines for this GPU / TensorRT version
    """
    from kdtool.export import export_bundle, find_latest_run

    bundle = export_bundle(run_dir or find_latest_run(), out=out, trt=trt or rebuild, overwrite=overwrite,
                           rebuild=rebuild, progress=progress, overrides=overrides)
    print_artefacts(bundle)


def print_artefacts(bundle: Path) -> None:
    """A table of the bundle's artefacts with their sizes and verification figures."""
    from kdtool.export import read_manifest

    manifest = read_manifest(bundle)
    rows = [("artefact", "file", "size", "check")]
    for key, entry in manifest["artefacts"].items():
        rows.append((key, entry["file"], f"{entry['size_bytes'] / 1024:.0f} KiB", _figures(entry["verification"])))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    click.echo(f"bundle: {bundle}")


def _figures(verification) -> str:
    if isinstance(verification, str):
        return verification
    if "accuracy" in verification:
        accuracy, kept = verification["accuracy"], verification["fallback"]["kept_in_float"]
        return (f"top-1 {accuracy['int8_top1']:.2f}% vs float {accuracy['float_top1']:.2f}% "
                f"(drop {accuracy['top1_drop']:.2f}), {len(kept)} node(s) kept in float")
    worst = {"max_abs_diff": max(f["max_abs_diff"] for f in verification["batch_sizes"].values()),
             "min_cosine": min(f["min_cosine"] for f in verification["batch_sizes"].values()),
             "top1_agreement": min(f["top1_agreement"] for f in verification["batch_sizes"].values())}
    return (f"vs PyTorch at batch {','.join(verification['batch_sizes'])}: max|diff| {worst['max_abs_diff']:.2g}, "
            f"cos {worst['min_cosine']:.6f}, top-1 agree {100 * worst['top1_agreement']:.1f}%")
