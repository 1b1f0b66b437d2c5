"""Reading a deploy bundle for bench: its validated manifest, its checked artefacts and its recipe."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from kdtool.bundle import RECIPE_FILE, Manifest, bundle_file, check_file, read_manifest
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
        unverified = entry.verification if isinstance(entry.verification, str) else None
        artefacts.append(Artefact(key, entry.precision, entry.kind, path, target=entry.target,
                                  engine=entry.engine.model_dump() if entry.engine else None, unverified=unverified))
    return tuple(artefacts)


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
