"""Reading a deploy bundle: its manifest, its artefacts, and the training run it came from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kdtool.errors import KdtoolError
from kdtool.export import MANIFEST_FILE, read_manifest
from kdtool.io import sha256_file

ARTEFACT_KINDS = ("onnx", "tensorrt")


@dataclass(frozen=True)
class Artefact:
    """One file of a bundle (`path`), or the float student it was exported from (kind "pytorch", `model`)."""

    key: str
    precision: str
    kind: str
    path: Path | None = None
    model: nn.Module | None = None


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: dict
    artefacts: tuple[Artefact, ...]
    input_name: str
    output_name: str
    run_dir: Path


def find_latest_bundle(root: Path = Path("export")) -> Path:
    """The most recently written bundle (a directory holding manifest.json) under `root`."""
    root = Path(root)
    manifests = sorted(root.glob(f"*/{MANIFEST_FILE}"), key=lambda path: path.stat().st_mtime) if root.is_dir() else []
    if not manifests:
        raise KdtoolError(f"no bundle (a directory with {MANIFEST_FILE}) under {root}/; run `kdtool export` first")
    return manifests[-1].parent


def _require(manifest: dict, keys: tuple[str, ...], source: Path):
    node = manifest
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise KdtoolError(f"{source}: missing key {'.'.join(keys[:depth + 1])}")
        node = node[key]
    return node


def _check_content(key: str, path: Path, entry: dict, source: Path) -> None:
    """KdtoolError when an artefact's size or sha256 differs from its manifest entry (truncated or replaced)."""
    if "size_bytes" in entry and path.stat().st_size != entry["size_bytes"]:
        raise KdtoolError(f"artefact {key!r} {path} is {path.stat().st_size} bytes, {source} says {entry['size_bytes']} "
                          f"(truncated or replaced; export the bundle again)")
    if "sha256" in entry and sha256_file(path) != entry["sha256"]:
        raise KdtoolError(f"artefact {key!r} {path} does not match the sha256 in {source} (replaced? export the bundle again)")


def load_bundle(bundle_dir: Path) -> Bundle:
    """Validate a bundle: manifest keys, every listed artefact present, the training run present."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    source = bundle_dir / MANIFEST_FILE
    listed = _require(manifest, ("artefacts",), source)
    if not isinstance(listed, dict) or not listed:
        raise KdtoolError(f"{source}: artefacts must be a non-empty mapping")
    artefacts = []
    for key, entry in listed.items():
        file, precision, kind = (_require(manifest, ("artefacts", key, field), source) for field in ("file", "precision", "kind"))
        if kind not in ARTEFACT_KINDS:
            raise KdtoolError(f"{source}: artefacts.{key}.kind must be one of {', '.join(ARTEFACT_KINDS)}, got {kind!r}")
        path = bundle_dir / file
        if not path.is_file():
            raise KdtoolError(f"artefact {key!r} listed in {source} is missing: {path}")
        _check_content(key, path, listed[key], source)
        artefacts.append(Artefact(key, precision, kind, path))
    for keys in (("preprocessing", "image_size"), ("preprocessing", "mean"), ("preprocessing", "std")):
        _require(manifest, keys, source)
    if not (bundle_dir / "recipe.yaml").is_file():
        raise KdtoolError(f"{bundle_dir / 'recipe.yaml'}: the bundle's resolved recipe is missing")
    run_dir = Path(_require(manifest, ("provenance", "run_dir"), source))
    if not run_dir.is_dir():
        raise KdtoolError(f"{source}: provenance.run_dir {run_dir} not found (the training run is needed for the teacher and float student)")
    return Bundle(
        directory=bundle_dir,
        manifest=manifest,
        artefacts=tuple(artefacts),
        input_name=_require(manifest, ("input", "name"), source),
        output_name=_require(manifest, ("output", "name"), source),
        run_dir=run_dir,
    )
