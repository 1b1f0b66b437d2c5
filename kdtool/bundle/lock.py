"""The lock of a bundle: held (flock) by the kdtool process exporting or benching it, so that a second one
is refused at once. The lock file lives beside the bundle, so that it survives the bundle being replaced;
the kernel releases the lock when its holder dies, so a killed export's lock never blocks the next one."""
from __future__ import annotations

import contextlib
from pathlib import Path

from kdtool.errors import KdtoolError
from kdtool.io import exclusive_lock


def lock_file(bundle_dir: Path) -> Path:
    """The lock file of a bundle: beside it, so that it survives the bundle being replaced."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.parent / f".{bundle_dir.name}.lock"


@contextlib.contextmanager
def bundle_lock(bundle_dir: Path):
    """Hold the bundle's lock (export and bench both take it); refuse at once when another process holds it."""
    path = lock_file(bundle_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdtoolError(f"cannot create the directory of the bundle lock {path}: {exc.strerror}") from None
    with exclusive_lock(path, f"bundle {bundle_dir}"):
        yield
