"""The reference set of a bundle: validation images (uint8, as `preprocessing` expects), labels, and the
teacher's and float student's logits at export, so that a bundle can be benched with nothing else.

Arrays are .npy files. Reading one checks its header (dtype, shape, layout, size on disk) against what
the manifest says before any data is read, then loads it with allow_pickle=False, so no file of a bundle
can run code or make kdtool allocate more than the file holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool.bundle.manifest import FileEntry, Manifest, Preprocessing, check_file, file_entry
from kdtool.errors import KdtoolError

REFERENCE_DIR = "reference"
REFERENCE_ARRAYS = ("images", "labels", "teacher_logits", "student_logits")
REFERENCE_BUDGET_BYTES = 64 << 20  # ~400 ImageNet-sized (224x224) images with 1000-class logits
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class Reference:
    """The arrays of a reference set, checked against the manifest."""

    images: np.ndarray  # uint8 (N, 3, H, W)
    labels: np.ndarray  # int64 (N,)
    teacher_logits: np.ndarray  # float32 (N, C)
    student_logits: np.ndarray  # float32 (N, C)
    description: str

    def preprocessed(self, start: int, stop: int, pre: Preprocessing) -> np.ndarray:
        """Images [start, stop) as the models take them: uint8 /255, then (x - mean) / std, float32."""
        mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
        return ((self.images[start:stop].astype(np.float32) / 255 - mean) / std).astype(np.float32)


def reference_count(requested: int, available: int, image_size: int, num_classes: int,
                    budget_bytes: int = REFERENCE_BUDGET_BYTES) -> int:
    """How many reference images a bundle carries: as requested, within the validation set and the byte budget."""
    per_image = 3 * image_size * image_size + 8 + 2 * 4 * num_classes
    return max(1, min(requested, available, budget_bytes // per_image))


def write_reference(staging: Path, arrays: dict[str, np.ndarray], split: str, selection: str) -> dict:
    """Save the reference arrays into `staging`/reference/; returns the manifest's `reference` entry."""
    (Path(staging) / REFERENCE_DIR).mkdir(exist_ok=True)
    entry = {"count": int(len(arrays["labels"])), "split": split, "selection": selection}
    for name in REFERENCE_ARRAYS:
        relative = f"{REFERENCE_DIR}/{name}.npy"
        np.save(Path(staging) / relative, np.ascontiguousarray(arrays[name]), allow_pickle=False)
        entry[name] = file_entry(staging, relative)
    return entry


def _check_header(path: Path, dtype, shape: tuple) -> None:
    """KdtoolError unless the .npy header of `path` says `dtype` and `shape` (C order) and the file holds
    exactly that many bytes after it; reads the header only."""
    expected = f"{np.dtype(dtype)} {list(shape)}"
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in NPY_HEADER_READERS:
                raise ValueError(f".npy format version {version} (kdtool writes 1.0)")
            got_shape, fortran, got_dtype = NPY_HEADER_READERS[version](handle)
            data_bytes = path.stat().st_size - handle.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise KdtoolError(f"reference array {path} is not a plain .npy array: {str(exc).splitlines()[0]}") from None
    if got_dtype != np.dtype(dtype) or tuple(got_shape) != tuple(shape) or fortran:
        raise KdtoolError(f"reference array {path}: its header says {got_dtype} {list(got_shape)}"
                          f"{' (Fortran order)' if fortran else ''}, the manifest expects {expected}")
    if data_bytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
        raise KdtoolError(f"reference array {path} holds {data_bytes} bytes of data, {expected} needs "
                          f"{int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize}")


def _load_array(bundle_dir: Path, entry: FileEntry, name: str, dtype, shape: tuple) -> np.ndarray:
    path = check_file(bundle_dir, entry, f"reference array {name}")
    _check_header(path, dtype, shape)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KdtoolError(f"reference array {path} is not a plain .npy array: {str(exc).splitlines()[0]}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise KdtoolError(f"reference array {path} holds NaN or infinite values")
    return array


def read_reference(bundle_dir: Path, manifest: Manifest) -> Reference:
    """The bundle's reference set, every array checked (hash, dtype, shape, label range, finiteness)."""
    ref, size, classes = manifest.reference, manifest.preprocessing.image_size, manifest.model.num_classes
    n = ref.count
    labels = _load_array(bundle_dir, ref.labels, "labels", np.int64, (n,))
    if labels.min() < 0 or labels.max() >= classes:
        raise KdtoolError(f"reference array {Path(bundle_dir) / ref.labels.file} has labels outside 0..{classes - 1}")
    return Reference(
        images=_load_array(bundle_dir, ref.images, "images", np.uint8, (n, 3, size, size)),
        labels=labels,
        teacher_logits=_load_array(bundle_dir, ref.teacher_logits, "teacher_logits", np.float32, (n, classes)),
        student_logits=_load_array(bundle_dir, ref.student_logits, "student_logits", np.float32, (n, classes)),
        description=f"the bundle's reference set: {n} {ref.split} images ({ref.selection})",
    )


