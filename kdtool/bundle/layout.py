"""Where a bundle lives and what kdtool may touch: file names, paths inside a bundle (never through a
symlink, never outside it), recognising a bundle kdtool wrote, the leftovers of killed writes, finding the
newest bundle.

    export/<name>/                   a bundle (manifest.json and what it lists, recipe.yaml, reports)
    export/.<name>.lock              its lock (kdtool.bundle.lock)
    export/.<name>.XXXXXXXX.partial  a bundle being written (renamed into place when complete)
    export/.<name>.XXXXXXXX.old      the bundle being replaced, for the instant of the swap
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path, PurePosixPath

from kdtool.errors import KdtoolError
from kdtool.io import check_replaceable, newest_owned

FORMAT_NAME = "kdtool-bundle"
MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.yaml"
TIMING_CACHE_FILE = "tensorrt.timing.cache"
REPORT_FILES = ("report.json", "report.md", "report.png")
STAGING_MARKER = ".kdtool-bundle-staging"  # inside a .partial directory until it becomes the bundle
MAX_MANIFEST_BYTES = 16 << 20


# ------------------------------------------------------------------ names and paths
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_plain_name(name: str, what: str) -> str:
    """`name` if it is one path component that cannot escape the directory it is put in, else KdtoolError."""
    if not isinstance(name, str) or not _COMPONENT.fullmatch(name):
        raise KdtoolError(f"{what} {name!r} must be a plain name: up to 128 letters, digits, '_', '.', '-', "
                          f"starting with a letter or digit (no path separators, not '.' or '..')")
    return name


def check_inside_bundle(value: str) -> str:
    """`value` if it is a relative path of at most one folder and a file, plain names only; else ValueError."""
    parts = PurePosixPath(value).parts
    if not 1 <= len(parts) <= 2 or any(not _COMPONENT.fullmatch(part) for part in parts) or "\\" in value:
        raise ValueError("must be a relative path inside the bundle (at most one folder, plain names, no '..')")
    return value


def bundle_dir_for(root: str | Path, name: str) -> Path:
    """`root/name`, the bundle directory a recipe names; KdtoolError when the name could escape `root`."""
    if ".." in Path(root).parts:
        raise KdtoolError(f"export.root {str(root)!r} must not contain '..'")
    return Path(root) / check_plain_name(name, "bundle name (export.name or the recipe name)")


def bundle_file(bundle_dir: Path, relative: str, what: str) -> Path:
    """The file `relative` inside `bundle_dir`, refused when it is a symlink or resolves outside the bundle."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / relative
    for part in [path, *list(path.parents)[: len(PurePosixPath(relative).parts) - 1]]:
        if part.is_symlink():
            raise KdtoolError(f"{what} {path} is a symbolic link; a bundle holds its own files")
    if not path.resolve().is_relative_to(bundle_dir.resolve()):
        raise KdtoolError(f"{what} {path} is outside the bundle {bundle_dir}")
    return path


# ------------------------------------------------------------------ ownership, leftovers, finding bundles
def is_bundle(directory: Path) -> bool:
    """Whether `directory` is a real directory holding a manifest kdtool wrote (format kdtool-bundle, any version)."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if directory.is_symlink() or not directory.is_dir() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return isinstance(data, dict) and isinstance(data.get("format"), dict) and data["format"].get("name") == FORMAT_NAME
    except (OSError, ValueError, RecursionError):
        return False


def check_bundle_target(target: Path) -> None:
    """KdtoolError unless `target` may become (or be replaced as) a bundle: absent, empty, or a kdtool bundle.

    Never the working directory, its parents, the home directory, `/`, or a symlink (kdtool.io.check_replaceable).
    """
    target = Path(target)
    check_replaceable(target, MANIFEST_FILE, "bundle")
    if target.is_dir() and any(target.iterdir()) and not is_bundle(target):
        raise KdtoolError(f"refusing to replace {target}: its {MANIFEST_FILE} is not a kdtool bundle manifest; "
                          f"choose another directory or remove it yourself")


def _leftover_pattern(name: str) -> re.Pattern:
    # kdtool.io.staging_dir: mkdtemp(prefix=".<name>.", suffix=".partial"); the swap renames the old one to .old
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(partial|old)")


def clean_leftovers(bundle_dir: Path) -> list[Path]:
    """Remove the .partial/.old directories killed writes of this bundle left (call with the lock held).

    Only real directories named as kdtool names them and holding kdtool's staging marker or a kdtool
    manifest (or nothing) are removed; returns them.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.parent.is_dir():
        return []
    pattern = _leftover_pattern(bundle_dir.name)
    removed = []
    for path in bundle_dir.parent.iterdir():
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        if not any(path.iterdir()) or (path / STAGING_MARKER).is_file() or is_bundle(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def find_latest_bundle(root: Path = Path("export")) -> Path:
    """The most recently written bundle under `root` (hidden leftovers and symlinks are never picked)."""
    latest = newest_owned(Path(root), is_bundle, dated_by=lambda path: path / MANIFEST_FILE)
    if latest is None:
        raise KdtoolError(f"no bundle (a directory with a kdtool {MANIFEST_FILE}) under {root}/; run `kdtool export` first")
    return latest


def made_from(bundle_dir: Path, run_dir: Path) -> bool:
    """Whether the bundle in `bundle_dir` was exported from `run_dir` (its provenance names that run)."""
    try:
        data = json.loads((Path(bundle_dir) / MANIFEST_FILE).read_text(encoding="utf-8")) if is_bundle(bundle_dir) else {}
        return Path(data["provenance"]["run_dir"]) == Path(run_dir).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False
