"""The command line starts without the stages: --help imports neither torch nor the recipe schema.

Each check runs in a fresh interpreter (a subprocess), since this test process has torch loaded
already; it asserts on sys.modules, not on time, so it fails whenever an import creeps back in.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import QUICKSTART, REPO

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "accelerate", "numpy", "pydantic")


def modules_after(code: str) -> set[str]:
    """Which of HEAVY a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_imports_no_stage():
    assert modules_after("import kdtool.cli") == set()


@pytest.mark.parametrize("command", [[], ["distill"], ["run"], ["export"], ["bench"], ["sweep"], ["recipe"],
                                     ["recipe", "check"]])
def test_help_imports_no_stage(command):
    code = ("from click.testing import CliRunner\nfrom kdtool.cli import cli\n"
            f"result = CliRunner().invoke(cli, {command + ['--help']!r})\n"
            "assert result.exit_code == 0 and 'Usage' in result.output, result.output")
    assert modules_after(code) == set()


def test_recipe_check_reads_the_recipe_without_torch_in_the_recipe_module():
    """Validating a recipe needs the schema (pydantic, yaml), not torch."""
    loaded = modules_after(f"from kdtool.recipe import load_recipe\nload_recipe({str(QUICKSTART)!r})")
    assert "torch" not in loaded and "pydantic" in loaded


def test_the_package_is_lazy_and_complete():
    assert modules_after("import kdtool\nkdtool.__version__") == set()
    assert "torch" in modules_after("from kdtool import distill")
    import kdtool

    for name in kdtool.__all__:
        assert getattr(kdtool, name) is not None
    assert set(kdtool.__all__) <= set(dir(kdtool))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdtool.nope  # noqa: B018


def test_library_log_records_reach_stderr_through_the_cli():
    """The CLI installs one handler on the `kdtool` logger: library records show as plain lines, debug ones
    only with --debug; the handler writes to the sys.stderr of the moment."""
    from kdtool.cli.common import configure_logging

    configure_logging()
    configure_logging()
    handlers = logging.getLogger("kdtool").handlers
    assert len(handlers) == 1
    logger = logging.getLogger("kdtool.some_stage")
    record = logging.LogRecord("kdtool.some_stage", logging.INFO, __file__, 1, "hello from the library", None, None)
    assert logger.isEnabledFor(logging.INFO) and not logger.isEnabledFor(logging.DEBUG)
    assert handlers[0].format(record) == "hello from the library"
    assert handlers[0].stream is sys.stderr
    configure_logging(debug=True)
    assert logger.isEnabledFor(logging.DEBUG)
    configure_logging()
