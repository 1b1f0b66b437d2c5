"""docs/reliability.md shows the table the fault tests stand behind."""
from __future__ import annotations

from figures import render
from runs import REPO


def test_docs_table_is_current():
    assert render() in (REPO / "docs" / "reliability.md").read_text(), "run `python tests/reliability/figures.py` and paste its table"
