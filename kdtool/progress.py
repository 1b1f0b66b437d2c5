"""Progress output for long loops that suits both a terminal and a log file.

On a terminal, a live tqdm bar. Anywhere else (a cluster job's log, a pipe, a test runner) no
carriage-return refreshes: one plain line every `every` steps (by default about 20 a loop, and at most
one every MIN_SECONDS_BETWEEN_LINES, so a short epoch gets its last line only) and one at the end, e.g.
``student 3/200: 400/2502 (16%) loss=2.3141 lr=0.1 [61s, 6.5 it/s]``. Used by the training loop;
export, bench and sweep loops can use it the same way (``for item in progress(items, ...)``).
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TextIO

LINES_PER_LOOP = 20  # in a log, about this many lines per loop when `every` is not given
MIN_SECONDS_BETWEEN_LINES = 10.0  # ... and no more than one line in this time (when `every` is not given)


class Progress:
    """Iterate `iterable`, reporting on `stream`: a tqdm bar when it is a terminal, else lines."""

    def __init__(self, iterable: Iterable, *, desc: str, total: Optional[int] = None, initial: int = 0,
                 enabled: bool = True, every: Optional[int] = None, stream: Optional[TextIO] = None):
        self.iterable, self.desc, self.total, self.count, self._handed = iterable, desc, total, initial, initial
        self.enabled, self.stream = enabled, stream if stream is not None else sys.stderr
        self.every = every or max(1, (total or 100 * LINES_PER_LOOP) // LINES_PER_LOOP)
        self.min_seconds = 0.0 if every else MIN_SECONDS_BETWEEN_LINES
        self.postfix: dict[str, str] = {}
        self._started, self._done_at_start, self._last_line = time.perf_counter(), initial, initial
        self._last_line_at = self._started
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            self._handed += 1
            yield item
            self.count += 1
            if self._bar is not None:
                self._bar.update(1)
            elif (self.enabled and self.count - self._last_line >= self.every
                  and time.perf_counter() - self._last_line_at >= self.min_seconds):
                self._line()

    def set_postfix(self, **values) -> None:
        """Values shown after the count (on the bar, or on the next line)."""
        self.postfix = {name: str(value) for name, value in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def close(self) -> None:
        """End the bar, or write the last line when steps were made since the previous one (a loop
        left with `break` has done the item it got last)."""
        if self._bar is not None and self._handed > self.count:
            self._bar.update(self._handed - self.count)
        self.count = max(self.count, self._handed)
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.count > self._last_line:
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._started
        rate = (self.count - self._done_at_start) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total} ({100 * self.count // self.total}%)" if self.total else ""
        shown = "".join(f" {name}={value}" for name, value in self.postfix.items())
        print(f"{self.desc}: {self.count}{of}{shown} [{elapsed:.0f}s, {rate:.2f} it/s]", file=self.stream, flush=True)
        self._last_line, self._last_line_at = self.count, time.perf_counter()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable, *, desc: str, total: Optional[int] = None, initial: int = 0, enabled: bool = True,
             every: Optional[int] = None, stream: Optional[TextIO] = None) -> Progress:
    """Wrap a long loop's iterable: ``for batch in progress(loader, desc="epoch 1", total=len(loader))``.
    `initial` counts steps already done (a resumed epoch); `enabled` False reports nothing."""
    return Progress(iterable, desc=desc, total=total, initial=initial, enabled=enabled, every=every, stream=stream)
