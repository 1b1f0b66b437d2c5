"""kdtool.progress: a live bar on a terminal, plain lines every N steps in a log."""
from __future__ import annotations

import io

from kdtool.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_every_n_steps_and_no_carriage_returns():
    log = io.StringIO()
    bar = progress(range(10), desc="student 1/2", total=10, every=4, stream=log)
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.2f}")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" [")[0] for line in lines] == [
        "student 1/2: 4/10 (40%) loss=0.25", "student 1/2: 8/10 (80%) loss=0.12", "student 1/2: 10/10 (100%) loss=0.10"]


def test_a_resumed_loop_counts_from_where_it_stopped_and_disabled_says_nothing():
    log = io.StringIO()
    bar = progress(range(3), desc="teacher 1/1", total=10, initial=7, every=100, stream=log)
    assert list(bar) == [0, 1, 2]
    bar.close()
    assert log.getvalue().startswith("teacher 1/1: 10/10 (100%)")
    quiet = io.StringIO()
    bar = progress(range(5), desc="x", total=5, enabled=False, stream=quiet)
    list(bar)
    bar.close()
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_live_bar():
    screen = _Terminal()
    bar = progress(range(5), desc="sweep", total=5, stream=screen)
    list(bar)
    bar.close()
    assert "\r" in screen.getvalue() and "sweep" in screen.getvalue()


def test_a_loop_left_with_break_reports_its_last_step():
    log = io.StringIO()
    bar = progress(range(10), desc="student 1/1", total=6, every=4, stream=log)
    for step in bar:
        if step == 5:
            break
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("student 1/1: 6/6 (100%)")


def test_without_a_cadence_a_log_gets_at_most_one_line_per_interval(monkeypatch):
    """A short epoch (steps much faster than the interval) writes its last line only, not ~20."""
    log = io.StringIO()
    bar = progress(range(200), desc="teacher 1/10", total=200, stream=log)
    list(bar)
    bar.close()
    assert log.getvalue().splitlines() and len(log.getvalue().splitlines()) == 1, log.getvalue()
    monkeypatch.setattr("kdtool.progress.MIN_SECONDS_BETWEEN_LINES", 0.0)
    log = io.StringIO()
    bar = progress(range(200), desc="teacher 1/10", total=200, stream=log)
    list(bar)
    bar.close()
    assert len(log.getvalue().splitlines()) == 20, log.getvalue()
