"""Atomic file and directory writes, content hashes, ownership, the lock and the newest-owned lookup.

Everything kdtool writes that a later step trusts (recipes, checkpoints, bundles) goes through
here: write beside the target, flush, then rename, so a killed process leaves the old file intact.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, data) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(target: Path, overwrite: bool = False):
    """Yield a fresh directory beside `target`; on success it becomes `target`.

    A failure leaves `target` as it was (and removes the half-written staging directory).
    With `overwrite`, an existing `target` is replaced only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(staging, 0o777 & ~_UMASK)
    try:
        yield staging
        if target.exists() and overwrite:
            retired = staging.with_suffix(".old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`; KdtoolError naming `what` and the file when it is missing or corrupt."""
    from kdtool.errors import KdtoolError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdtoolError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdtoolError(f"{what} {path} is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise KdtoolError(f"{what} {path} is corrupt: expected a JSON object")
    return data


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ ownership
def forbidden_target(path: Path) -> str | None:
    """Why kdtool may never delete or replace `path` (the working directory, one of its parents,
    the home directory, the filesystem root, or a symlink), or None."""
    path = Path(path)
    if path.is_symlink():
        return "it is a symbolic link"
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the working directory or one of its parents"
    if resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        return "it is the home directory or the filesystem root"
    return None


def check_replaceable(path: Path, marker: str, kind: str) -> None:
    """KdtoolError unless `path` is absent, empty, or a `kind` kdtool made (it holds `marker`).

    `marker` is the file kdtool writes into every directory of that kind; a directory without it,
    or one of the forbidden places above, is never deleted, whatever the flags say.
    """
    from kdtool.errors import KdtoolError

    path = Path(path)
    why = forbidden_target(path)
    if why:
        raise KdtoolError(f"refusing to replace {path}: {why}")
    if not path.exists():
        return
    if not path.is_dir():
        raise KdtoolError(f"refusing to replace {path}: it is a file, not a {kind}")
    if any(path.iterdir()) and not (path / marker).is_file():
        raise KdtoolError(f"refusing to replace {path}: it is not a {kind} made by kdtool (no {marker}); "
                          f"choose another directory or remove it yourself")


def remove_tree_inside(root: Path, child: Path) -> None:
    """Delete `child`, a directory inside `root`, without following a symlink out of `root`.

    A symlinked `child` loses only the link; shutil.rmtree itself never descends into symlinks.
    """
    root, child = Path(root), Path(child)
    if child.is_symlink() or not child.is_dir():
        child.unlink(missing_ok=True)
        return
    if not child.resolve().is_relative_to(root.resolve()):
        return  # reached through a symlinked parent: not ours to delete
    shutil.rmtree(child, ignore_errors=True)


def clear_directory(directory: Path, keep: tuple[str, ...] = ()) -> None:
    """Empty `directory` (already checked with `check_replaceable`), never following symlinks."""
    for child in Path(directory).iterdir():
        if child.name not in keep:
            remove_tree_inside(directory, child)


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created if absent) for the block; a second kdtool
    process is refused at once with one line naming `what`. A symlink at `path` is never followed.

    The lock is advisory and released when the process ends, also when it is killed.
    """
    from kdtool.errors import KdtoolError

    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise KdtoolError(f"cannot open the lock of {what}, {path}: {why}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KdtoolError(f"{what} is in use by another kdtool process") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def newest_owned(root: Path, is_owned: Callable[[Path], bool],
                 dated_by: Callable[[Path], Path] = lambda path: path) -> Optional[Path]:
    """The entry of `root` that `is_owned` accepts with the newest modification time of `dated_by(entry)`;
    None when there is none. Symlinks and hidden names (kdtool's own leftovers) are never picked."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [path for path in root.iterdir()
                  if not path.name.startswith(".") and not path.is_symlink() and is_owned(path)]
    return max(candidates, key=lambda path: dated_by(path).stat().st_mtime, default=None)
