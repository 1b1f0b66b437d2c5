"""`kdtool export`: a run's best student -> a verified deploy bundle."""
from __future__ import annotations

from pathlib import Path

import click

from kdtool.cli.common import debug_option, handle_errors, set_option


@click.command()
@click.argument("source", metavar="[RUN | BUNDLE]", required=False, type=click.Path(path_type=Path))
@click.option("--trt", is_flag=True, help="Also build strongly typed TensorRT engines (needs tensorrt >= 10.12 and an NVIDIA GPU).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle directory (default: <export.root>/<export.name or recipe name>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory (only a kdtool bundle).")
@click.option("--rebuild", is_flag=True,
              help="Rebuild the TensorRT engines of an existing bundle for this machine, from the bundle alone.")
@set_option
@click.option("--progress/--no-progress", default=True, help="Report each step on stderr.")
@debug_option
@handle_errors
def export(source, trt, out, overwrite, rebuild, overrides, progress):
    """Export the best student of RUN (default: the most recent run under runs/) to a portable deploy
    bundle: ONNX FP32 checked against PyTorch; INT8 Q/DQ for ONNX Runtime on CPUs and symmetric INT8 for
    TensorRT, calibrated on training images (with accuracy-aware fallback); FP16; a reference set of
    validation images with teacher and float-student logits; and strongly typed TensorRT engines with
    --trt. --set overrides the run recipe's export section. With --rebuild, SOURCE may be a BUNDLE
    (default: the newest under export/): its engines are rebuilt here with no run directory needed.

    \b
    Examples:
        kdtool export
        kdtool export runs/quickstart --out /tmp/bundle --overwrite
        kdtool export --set export.int8.method=entropy --set export.int8.max_top1_drop=0.5
        kdtool export runs/imagenet_r50_mbv2 --trt
        kdtool export --trt --rebuild export/quickstart   # engines for this GPU / TensorRT version
    """
    from kdtool.bundle import find_latest_bundle, is_bundle
    from kdtool.export import export_bundle, find_latest_run, rebuild_engines

    if rebuild and (source is None and out is None or source is not None and is_bundle(source)):
        bundle = rebuild_engines(source or find_latest_bundle(), overrides=overrides, progress=progress)
    else:
        bundle = export_bundle(source or find_latest_run(), out=out, trt=trt or rebuild, overwrite=overwrite,
                               rebuild=rebuild, progress=progress, overrides=overrides)
    print_artefacts(bundle)


def print_artefacts(bundle: Path) -> None:
    """A table of the bundle's artefacts with their target, size and verification figures."""
    from kdtool.export import read_manifest

    manifest = read_manifest(bundle)
    from kdtool.tables import text_table

    rows = [(key, entry.target, entry.file, f"{entry.size_bytes / 1024:.0f} KiB", _figures(entry.verification))
            for key, entry in manifest.artefacts.items()]
    click.echo(text_table(("artefact", "target", "file", "size", "check"), rows))
    click.echo(f"reference set: {manifest.reference.count} {manifest.reference.split} images; bundle: {bundle}")


def _figures(verification) -> str:
    if isinstance(verification, str):
        return verification
    if hasattr(verification, "accuracy"):
        accuracy, kept = verification.accuracy, verification.fallback.kept_in_float
        return (f"top-1 {accuracy.int8_top1:.2f}% vs float {accuracy.float_top1:.2f}% (drop {accuracy.top1_drop:.2f}, "
                f"{accuracy.numerics}), {len(kept)} node(s) kept in float")
    figures = verification.batch_sizes.values()
    return (f"vs PyTorch at batch {','.join(verification.batch_sizes)}: "
            f"max|diff| {max(f.max_abs_diff for f in figures):.2g}, cos {min(f.min_cosine for f in figures):.6f}, "
            f"top-1 agree {100 * min(f.top1_agreement for f in figures):.1f}%")
