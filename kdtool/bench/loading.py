"""Reading a deploy bundle for bench: its validated manifest, its checked artefacts (size, sha256, and for
the TensorRT INT8 ONNX the constraints TensorRT puts on its Q/DQ nodes) and its recipe."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from kdtool.bundle import RECIPE_FILE, BundleMismatch, Manifest, bundle_file, check_file, read_manifest
from kdtool.errors import KdtoolError
from kdtool.recipe import Recipe, load_recipe


@dataclass(frozen=True)
class Artefact:
    """One file of a bundle (`path`), or the float student it was exported from (kind "pytorch", `model`)."""

    key: str
    precision: str
    kind: str
    path: Optional[Path] = None
    model: Optional[nn.Module] = None
    target: str = "pytorch"
    engine: Optional[dict] = None  # TensorRT engines: what they were built for (checked before deserialising)
    unverified: Optional[str] = None  # export's reason when it could not check the artefact on ONNX Runtime (CPU)


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: Manifest
    artefacts: tuple[Artefact, ...]
    recipe: Recipe

    @property
    def input_name(self) -> str:
        return self.manifest.input.name

    @property
    def output_name(self) -> str:
        return self.manifest.output.name


def _artefacts(bundle_dir: Path, manifest: Manifest) -> tuple[Artefact, ...]:
    artefacts = []
    for key, entry in manifest.artefacts.items():
        path = check_file(bundle_dir, entry, f"artefact {key!r}")
        if entry.quantization is not None and entry.quantization.scheme == "s8s8-symmetric":
            _check_tensorrt_qdq(path, key)
        unverified = entry.verification if isinstance(entry.verification, str) else None
        artefacts.append(Artefact(key, entry.precision, entry.kind, path, target=entry.target,
                                  engine=entry.engine.model_dump() if entry.engine else None, unverified=unverified))
    return tuple(artefacts)


def _check_tensorrt_qdq(path: Path, key: str) -> None:
    """BundleMismatch (exit 2) when an artefact made for TensorRT breaks TensorRT's Q/DQ constraints, before any
    runtime judges it: an emulated run would pass what TensorRT's parser refuses."""
    import onnx

    from kdtool.export.quantize import tensorrt_qdq_violations

    try:
        model = onnx.load(str(path))
    except Exception:  # noqa: BLE001  not an ONNX file: each runtime that serves it fails it (exit 1)
        return
    violations = tensorrt_qdq_violations(model)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise BundleMismatch(f"artefact {key!r} {path} breaks TensorRT's Q/DQ constraints (its manifest says "
                             f"s8s8-symmetric): {violations[0]}{more}")


def bundle_recipe(bundle_dir: Path, manifest: Manifest) -> Recipe:
    """The bundle's recipe.yaml (bench settings and gate), refused when it differs from the one exported."""
    path = bundle_file(bundle_dir, RECIPE_FILE, "bundle recipe")
    if not path.is_file():
        raise KdtoolError(f"{path}: the bundle's resolved recipe is missing")
    recipe = load_recipe(path)
    if recipe.digest() != manifest.provenance.recipe_sha256:
        raise KdtoolError(f"{path} does not match provenance.recipe_sha256 in the manifest (edited? export again)")
    return recipe


def load_bundle(bundle_dir: Path) -> Bundle:
    """Validate a bundle: the manifest through its schema, every artefact's size and sha256, the recipe."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    return Bundle(bundle_dir, manifest, _artefacts(bundle_dir, manifest), bundle_recipe(bundle_dir, manifest))
