"""The deploy bundle, which export writes and bench reads: the artefact table (`artefacts`), the manifest
model (`manifest`), where a bundle lives and what kdtool may touch (`layout`), the reference set
(`reference`) and the lock (`lock`). It imports nothing of export's or bench's.

    export/<name>/
      manifest.json                  the Manifest (format kdtool-bundle, version 3)
      recipe.yaml                    the resolved recipe of the run (with `--set export.*` overrides)
      model.*.onnx, model.*.engine   the artefacts of the table in kdtool.bundle.artefacts
      tensorrt.timing.cache          TensorRT's timing cache, shared by the engine builds and `--rebuild`
      reference/{images,labels,teacher_logits,student_logits}.npy   the reference set
      report.{json,md,png}           written by `kdtool bench`
"""
from kdtool.bundle.artefacts import ACCURACY, ARTEFACTS, ENGINE_SOURCES, TARGETS, ArtefactKind
from kdtool.bundle.layout import (
    FORMAT_NAME, MANIFEST_FILE, RECIPE_FILE, REPORT_FILES, STAGING_MARKER, TIMING_CACHE_FILE, bundle_dir_for,
    bundle_file, check_bundle_target, check_plain_name, clean_leftovers, find_latest_bundle, is_bundle, made_from,
)
from kdtool.bundle.lock import bundle_lock, lock_file
from kdtool.bundle.manifest import (
    FORMAT_VERSION, PREPROCESSING, Artefact, FileEntry, Manifest, Preprocessing, check_file, file_entry,
    read_manifest, write_manifest,
)
from kdtool.bundle.reference import (
    REFERENCE_ARRAYS, REFERENCE_BUDGET_BYTES, REFERENCE_DIR, Reference, read_reference, reference_count,
    write_reference,
)
from kdtool.errors import KdtoolError


class BundleMismatch(KdtoolError):
    """An artefact does not fit what its manifest says (tensor names, shapes, engine target): exit 2."""


__all__ = [
    "ACCURACY", "ARTEFACTS", "ENGINE_SOURCES", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_FILE", "PREPROCESSING",
    "RECIPE_FILE", "REFERENCE_ARRAYS", "REFERENCE_BUDGET_BYTES", "REFERENCE_DIR", "REPORT_FILES", "STAGING_MARKER",
    "TARGETS", "TIMING_CACHE_FILE", "Artefact", "ArtefactKind", "BundleMismatch", "FileEntry", "Manifest",
    "Preprocessing", "Reference", "bundle_dir_for", "bundle_file", "bundle_lock", "check_bundle_target",
    "check_file", "check_plain_name", "clean_leftovers", "file_entry", "find_latest_bundle", "is_bundle",
    "lock_file", "made_from", "read_manifest", "read_reference", "reference_count", "write_manifest",
    "write_reference",
]
