"""docs/reliability.md shows the trials the fault tests counted; the counting itself can see a failure."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from figures import FAULTS, REPO, Record, TrialCounter, docs_skipped, family_of, render

PAGE = REPO / "docs" / "reliability.md"


def test_docs_table_shows_the_counts_of_this_full_run(trial_record):
    """Runs last (conftest orders it); compares only a session that ran every family, as the page's run did."""
    if trial_record.deselected:
        pytest.skip("reliability tests were deselected (-k/-m): the page's counts come from a full run")
    if trial_record.missing():
        pytest.skip(f"families not run in this session: {', '.join(trial_record.missing())}")
    page = PAGE.read_text()
    if set(trial_record.skipped) != docs_skipped(page):
        pytest.skip(f"this machine skipped {sorted(trial_record.skipped) or 'nothing'}, the page's run skipped "
                    f"{sorted(docs_skipped(page)) or 'nothing'}: counts compare only between runs that skip alike")
    assert render(trial_record) in page, (
        "docs/reliability.md disagrees with this run's counts: paste `python tests/reliability/figures.py`\n"
        + render(trial_record))


def _report(nodeid, when="call", outcome="passed", **extra):
    return SimpleNamespace(nodeid=f"tests/reliability/{nodeid}", when=when, outcome=outcome, passed=outcome == "passed",
                           failed=outcome == "failed", skipped=outcome == "skipped", **extra)


def test_a_trial_that_raises_is_run_but_not_survived():
    counter = TrialCounter("recipe_fuzz")
    with counter.trial():
        pass
    with pytest.raises(AssertionError), counter.trial():
        raise AssertionError("a promise broken")
    with pytest.raises(pytest.skip.Exception), counter.trial():
        pytest.skip("no TensorRT")
    assert (counter.run, counter.survived) == (2, 1)
    record = Record()
    record.observe(_report("test_recipe_fuzz.py::test_x", outcome="failed"), [counter])
    assert record.counts == {"recipe_fuzz": [2, 1]}
    assert "| 2 | 1 |" in render(record)


def test_tests_without_a_counter_count_as_one_trial_each():
    record = Record()
    record.observe(_report("test_kill.py::test_sigkill_at_random_points_then_resume"), [])
    record.observe(_report("test_corrupt_files.py::test_truncated_onnx", outcome="failed"), [])
    record.observe(_report("test_corrupt_files.py::test_engine_from_another_tensorrt_version", when="setup",
                           outcome="skipped"), [])
    record.observe(_report("test_corrupt_files.py::test_x[case]", outcome="skipped", wasxfail="reader unsafe"), [])
    record.observe(_report("test_unrelated.py::test_y"), [])
    record.observe(_report("test_figures.py::test_docs_table_shows_the_counts_of_this_full_run", outcome="skipped"), [])
    assert record.counts == {"sigkill": [1, 1], "corrupt": [2, 0]}
    assert record.skipped == ["test_corrupt_files.py::test_engine_from_another_tensorrt_version"]
    assert "sigkill" not in record.missing() and "corrupt" not in record.missing() and not record.is_full()


def test_family_of_prefers_the_most_specific_test():
    assert family_of("test_kill.py::test_second_process_on_a_run_dir_is_refused") == "lock"
    assert family_of("test_kill.py::test_sigint_and_sigterm_stop_cleanly[SIGINT]") == "signal_cli"
    assert family_of("test_corrupt_files.py::test_truncated_onnx") == "corrupt"
    assert family_of("test_corrupt_files_extra.py::test_z") is None


def test_rendered_page_round_trips_its_skipped_tests():
    record = Record({key: [3, 3] for key in FAULTS}, ["test_disk_full.py::test_checkpoint_on_a_full_tmpfs", "b.py::t"])
    assert record.is_full()
    assert docs_skipped(render(record)) == set(record.skipped)
    assert docs_skipped(render(Record())) == set()
    again = Record.from_json(record.to_json())
    assert again.counts == record.counts and set(again.skipped) == set(record.skipped)
