"""Disk full while writing a checkpoint or a bundle: the previous good one stays intact."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest

from kdtool.checkpoint import read_state
from kdtool.export import export_bundle
from kdtool.io import sha256_file
from kdtool.models import read_state_dict
from runs import MICRO, QUICKSTART, REPO, one_line_error, reference, same_run, set_args, start_distill, wait_for  # noqa: F401

FILE_LIMIT = 64 * 1024  # bytes; a checkpoint's weights or an ONNX model of resnet8 is ~300 KiB
SMALL_EXPORT = ["export.int8.enabled=false", "export.fp16=false"]


def ignore_file_size_signal():
    """In the child: writes past RLIMIT_FSIZE fail with EFBIG instead of killing the process with SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def limit_file_size():
    ignore_file_size_signal()
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def fill_tmpfs(mount):
    """Leave less free space on the tmpfs than one checkpoint needs."""
    stat = os.statvfs(mount)
    (mount / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 32 * 1024))


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fail_then_resume(run_dir, reference_dir, cli_runner, fill, preexec_fn=None):
    """Run until the student's first checkpoint, make the disk full, expect a clean failure, free it, resume."""
    process = start_distill(run_dir, preexec_fn=preexec_fn)
    wait_for(run_dir / "last", process)
    fill(process)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    line = one_line_error(stderr)
    assert "cannot write checkpoint" in line and "still holds the previous one" in line, line
    kept = read_state(run_dir / "last")
    assert not kept["finished"] and read_state_dict(run_dir / "last")
    (run_dir.parent / "filler").unlink(missing_ok=True)
    result = cli_runner("distill", QUICKSTART, "--out", run_dir, "--resume", *set_args(MICRO))
    assert result.exit_code == 0, result.output
    assert same_run(run_dir, reference_dir)


@pytest.mark.slow
def test_checkpoint_past_the_file_size_limit(reference, tmp_path, cli_runner):
    limit = lambda process: resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))  # noqa: E731
    fail_then_resume(tmp_path / "run", reference[0], cli_runner, limit, preexec_fn=ignore_file_size_signal)


@pytest.mark.slow
def test_checkpoint_on_a_full_tmpfs(reference, tmpfs, cli_runner):
    fail_then_resume(tmpfs / "run", reference[0], cli_runner, lambda _: fill_tmpfs(tmpfs))


def test_bundle_past_the_file_size_limit(reference, tmp_path):
    bundle = export_bundle(reference[0], out=tmp_path / "bundle", overrides=SMALL_EXPORT, progress=False)
    before = {path.relative_to(bundle): sha256_file(path) for path in bundle.rglob("*") if path.is_file()}
    args = [sys.executable, "-m", "kdtool.cli", "export", str(reference[0]), "--out", str(bundle), "--overwrite",
            "--no-progress", *set_args(SMALL_EXPORT)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, preexec_fn=limit_file_size, timeout=300)
    assert done.returncode == 2, done.stderr
    one_line_error(done.stderr)
    assert {path.relative_to(bundle): sha256_file(path) for path in bundle.rglob("*") if path.is_file()} == before
    assert not [p for p in bundle.parent.iterdir() if p.name.endswith(".partial")]
