"""Reliability-suite plumbing: the `fault_trials` recorder (see figures.py) and test_figures.py last.

Both conftest.py files get the module name `conftest` under pytest's rootdir imports, and the one
imported last is what every `from conftest import ...` in tests/ then sees; so this file re-exports the
public names of tests/conftest.py (its fixtures stay registered from there).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from figures import RECORD_DIR, RECORD_FILE, Record, TrialCounter, short_id

_spec = importlib.util.spec_from_file_location("_kdtool_tests_conftest", Path(__file__).parents[1] / "conftest.py")
_tests_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests_conftest)
globals().update({name: value for name, value in vars(_tests_conftest).items()
                  if not name.startswith("_") and name not in globals() and not hasattr(value, "_fixture_function_marker")})

RECORD = pytest.StashKey[Record]()
COUNTERS = pytest.StashKey[dict]()  # node id -> the TrialCounters its test made


def pytest_configure(config):
    config.stash[RECORD] = Record()
    config.stash[COUNTERS] = {}


@pytest.fixture
def fault_trials(request):
    """`fault_trials("family")` -> a TrialCounter whose `with counter.trial():` blocks are counted."""
    counters = request.config.stash[COUNTERS].setdefault(request.node.nodeid, [])

    def counter(family: str) -> TrialCounter:
        counters.append(TrialCounter(family))
        return counters[-1]

    return counter


@pytest.fixture
def trial_record(request) -> Record:
    """What this session has counted so far."""
    return request.config.stash[RECORD]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield  # outermost wrapper (a conftest's): xfail marks are already applied to the report
    final = report.when == "call" or (report.when == "setup" and not report.passed)  # the test's outcome
    if final and "tests/reliability/" in item.nodeid:
        item.config.stash[RECORD].observe(report, item.config.stash[COUNTERS].pop(item.nodeid, []))
    return report


def pytest_collection_modifyitems(items):
    """In-process signal tests first (before earlier tests have run ONNX Runtime's and OpenVINO's threads in
    this process: after them a signal to the process crashed it with SIGSEGV, cause not traced), the
    figures check last; the rest keep their order."""
    def rank(item) -> int:
        name = short_id(item.nodeid)
        return 2 if name.startswith("test_figures.py") else 0 if name.startswith("test_interrupt.py") else 1

    items.sort(key=rank)


def pytest_deselected(items):
    if any("tests/reliability/" in item.nodeid for item in items):
        items[0].config.stash[RECORD].deselected = True


def pytest_sessionfinish(session):
    record, cache = session.config.stash[RECORD], getattr(session.config, "cache", None)
    if record.is_full() and cache is not None:
        (cache.mkdir(RECORD_DIR) / RECORD_FILE).write_text(record.to_json())
