"""kdtool.io's newest-owned lookup: what `export` and `bench` pick when given no run or bundle."""
from __future__ import annotations

import os

from kdtool.io import newest_owned


def _stamped(path, mtime):
    path.mkdir(parents=True)
    (path / "mark").write_text("x")
    os.utime(path / "mark", (mtime, mtime))
    return path


def test_newest_owned_picks_the_newest_owned_entry_and_never_a_link_or_a_leftover(tmp_path):
    root = tmp_path / "root"
    old, new = _stamped(root / "old", 1_000), _stamped(root / "new", 2_000)
    _stamped(root / "foreign", 9_000).joinpath("mark").rename(root / "foreign" / "other")  # not owned
    _stamped(root / ".new.abcdefgh.partial", 9_000)  # a leftover of a killed write
    (root / "link").symlink_to(_stamped(tmp_path / "elsewhere", 9_000))

    def owned(path):
        return (path / "mark").is_file()

    assert newest_owned(root, owned, dated_by=lambda path: path / "mark") == new
    os.utime(old / "mark", (3_000, 3_000))
    assert newest_owned(root, owned, dated_by=lambda path: path / "mark") == old
    assert newest_owned(root, lambda path: False) is None
    assert newest_owned(tmp_path / "missing", owned) is None
