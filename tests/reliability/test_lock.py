"""The lock of a run (or sweep) directory never follows a symlink and refuses a second holder in one line.

kdtool.io.exclusive_lock opens the lock file with O_NOFOLLOW: a link planted where `.lock` goes, to a
user's file, to nowhere, or to a directory, is refused without writing or creating its target.
"""
from __future__ import annotations

import os

import pytest

from conftest import QUICKSTART, TINY, one_line_error
from kdtool.errors import KdtoolError
from kdtool.io import exclusive_lock
from kdtool.rundir import LOCK_FILE, claim, run_lock


@pytest.mark.parametrize("target_kind", ["user file", "dangling", "directory"])
def test_a_symlinked_lock_is_refused_and_its_target_untouched(target_kind, tmp_path, fault_trials):
    with fault_trials("lock_link").trial():
        run_dir, target = tmp_path / "run", tmp_path / "precious"
        run_dir.mkdir()
        if target_kind == "user file":
            target.write_text("the user's data")
        elif target_kind == "directory":
            target.mkdir()
        (run_dir / LOCK_FILE).symlink_to(target)
        with pytest.raises(KdtoolError, match=rf"lock of run directory {run_dir}.*symbolic link"):
            with run_lock(run_dir):
                pass
        if target_kind == "user file":
            assert target.read_text() == "the user's data"
        else:
            assert target.is_dir() if target_kind == "directory" else not os.path.lexists(target)


def test_a_held_lock_refuses_a_second_holder_in_one_line(tmp_path, fault_trials):
    """flock locks belong to the open file: a second open in this very process is refused like another process."""
    with fault_trials("lock_link").trial():
        lock = tmp_path / "x.lock"
        with exclusive_lock(lock, "thing T"):
            with pytest.raises(KdtoolError, match="^thing T is in use by another kdtool process$"):
                with exclusive_lock(lock, "thing T"):
                    pass
        with exclusive_lock(lock, "thing T"):  # released on leaving the block
            pass


def test_distill_onto_a_run_with_a_planted_lock_link_is_one_line(tmp_path, cli_runner, fault_trials):
    with fault_trials("lock_link").trial():
        run_dir, target = tmp_path / "run", tmp_path / "precious"
        claim(run_dir)  # a kdtool run directory ...
        target.write_text("the user's data")
        (run_dir / LOCK_FILE).symlink_to(target)  # ... whose lock someone replaced by a link
        args = [arg for override in TINY for arg in ("--set", override)]
        line = one_line_error(cli_runner("distill", QUICKSTART, *args, "--out", run_dir, "--overwrite"))
        assert "symbolic link" in line and str(run_dir) in line
        assert target.read_text() == "the user's data"
