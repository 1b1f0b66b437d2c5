"""Tables, written one way each: markdown for report files, rich for what a terminal shows."""
from __future__ import annotations

import io
from typing import Iterable, Sequence


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table laid out by rich (no colour, no wrapping), for messages and terminal output."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: a cell's brackets are never read as markup
    out = io.StringIO()
    Console(file=out, width=10_000, color_system=None, soft_wrap=True).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip())
