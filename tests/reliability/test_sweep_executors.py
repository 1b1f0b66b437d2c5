"""Sweeps on Ray and cells that fail: a local Ray (2 CPUs) runs the cells two at a time and equals the
serial executor bit for bit; a worker SIGKILLed mid-cell is retried and resumes from the cell's
checkpoint; a failing cell is reported with its reason while the others finish; Ctrl-C cancels what
is outstanding and keeps what finished."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import one_line_error
from kdtool.rundir import LOCK_FILE, SUMMARY_FILE
from kdtool.sweep import ExecutorConfig, run_sweep
from runs import MICRO, QUICKSTART, REPO, metrics, same_weights, set_args
from runs import one_line_error as stderr_error

ray = pytest.importorskip("ray", reason="the ray executor's tests need Ray (pip install 'kdtool[ray]')")

# One thread per cell: the serial executor then computes exactly what a Ray worker (1 CPU) does.
ONE_THREAD = [o for o in MICRO if not o.startswith("runtime.threads")] + ["runtime.threads=1"]
GRID = {"method.name": ["kd", "ccd"]}
RAY = ExecutorConfig(name="ray")


@ray.remote(num_cpus=1)
def warm_worker():
    import kdtool.train  # noqa: F401 - what a cell imports first

    time.sleep(1)  # both tasks at once: two workers


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module's in-process sweeps (run_sweep uses a session it finds running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.get([warm_worker.remote() for _ in range(2)])  # two workers started, so cells need not wait for one
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """In-process serial cells set torch's thread count (runtime.threads=1); other tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("serial") / "sweep"
    rows = run_sweep(QUICKSTART, GRID, seeds=2, overrides=ONE_THREAD, out=out, progress=False)
    torch.set_num_threads(threads)
    return out, rows


def without_run_dir(rows):
    return [{k: v for k, v in row.items() if k != "run_dir"} for row in rows]


def same_cell(cell_dir: Path, reference_dir: Path) -> bool:
    return metrics(cell_dir) == metrics(reference_dir) and same_weights(cell_dir / "last", reference_dir / "last")


def interval(cell_dir: Path) -> tuple[float, float]:
    """When a cell started (its recipe written) and ended (its summary written)."""
    return (cell_dir / "recipe.yaml").stat().st_mtime, (cell_dir / SUMMARY_FILE).stat().st_mtime


def test_ray_runs_cells_side_by_side_and_equals_serial(local_ray, serial_sweep, tmp_path):
    serial_dir, serial_rows = serial_sweep
    rows = run_sweep(QUICKSTART, GRID, seeds=2, overrides=ONE_THREAD, out=tmp_path / "ray", progress=False, executor=RAY)
    assert without_run_dir(rows) == without_run_dir(serial_rows)
    for name in ("results.csv", "table.csv", "table.md"):
        assert (tmp_path / "ray" / name).read_text() == (serial_dir / name).read_text().replace(str(serial_dir), str(tmp_path / "ray"))
    for row in rows:
        assert same_cell(Path(row["run_dir"]), serial_dir / Path(row["run_dir"]).name)
    spans = sorted(interval(Path(row["run_dir"])) for row in rows)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two cells overlapped: {spans}"


def lock_holders(cell_dir: Path) -> list[int]:
    """Processes holding a cell's run lock open (the worker training it), from /proc."""
    target, pids = str((cell_dir / LOCK_FILE).resolve()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def kill_a_worker_mid_cell(sweep_dir: Path, done: threading.Event) -> str:
    """SIGKILL the worker of the first cell seen with a checkpoint and no summary; the cell's name."""
    while not done.is_set():
        for cell_dir in sorted(sweep_dir.glob("method.name=*")):
            if (cell_dir / "last").exists() and not (cell_dir / SUMMARY_FILE).exists():
                for pid in lock_holders(cell_dir):
                    if pid != os.getpid():
                        os.kill(pid, signal.SIGKILL)
                        return cell_dir.name
        time.sleep(0.02)
    return ""


def test_a_worker_killed_mid_cell_is_retried_and_resumes(local_ray, serial_sweep, tmp_path, fault_trials):
    serial_dir, serial_rows = serial_sweep
    trials = fault_trials("sweep_worker_kill")
    with trials.trial():
        out, result, done = tmp_path / "killed", {}, threading.Event()

        def sweep():
            try:
                result["rows"] = run_sweep(QUICKSTART, GRID, seeds=2, overrides=ONE_THREAD, out=out, progress=False,
                                           executor=RAY)
            finally:
                done.set()

        driver = threading.Thread(target=sweep)
        driver.start()
        killed = kill_a_worker_mid_cell(out, done)
        driver.join(timeout=600)
        assert killed, "no cell was seen mid-training to kill"
        rows = result["rows"]
        assert without_run_dir(rows) == without_run_dir(serial_rows), killed
        assert same_cell(out / killed, serial_dir / killed), killed


FAILING_GRID = {"train.optimizer.lr": [0.05, 1e12]}  # the second diverges (loss becomes nan/inf)


@pytest.mark.parametrize("executor", ["serial", "ray"])
def test_a_failing_cell_is_named_while_the_others_finish(local_ray, tmp_path, cli_runner, fault_trials, executor):
    trials = fault_trials("sweep_cell_fails")
    with trials.trial():
        out = tmp_path / "sweep"
        result = cli_runner("sweep", QUICKSTART, "--grid", "train.optimizer.lr=0.05,1e12", *set_args(ONE_THREAD),
                            "--seeds", "2", "--out", out, "--executor", executor, "--no-progress")
        line = one_line_error(result, code=1)
        assert "2 of 4 sweep cells failed" in line and "train.optimizer.lr=1e12,seed=0" in line, line
        table = (out / "table.md").read_text()
        assert "| 1e12 | 0 + 2 failed |" in table and "| 0.05 | 2 |" in table, table
        assert table.count("loss became") == 2 and "train.optimizer.lr=1e12,seed=1: " in table, table
        assert (out / "plot.png").exists() and (out / "table.csv").exists()
        assert all((out / f"train.optimizer.lr=0.05,seed={s}" / SUMMARY_FILE).exists() for s in (0, 1))


def test_a_failing_teacher_fails_its_cells_with_its_reason(tmp_path, fault_trials):
    with fault_trials("sweep_cell_fails").trial():
        rows = run_sweep(QUICKSTART, GRID, seeds=1, overrides=[*ONE_THREAD, "teacher.train.optimizer.lr=1e12"],
                         out=tmp_path / "s", progress=False)
        assert [row["status"] for row in rows] == ["failed", "failed"]
        assert all(row["reason"].startswith(f"its teacher {tmp_path / 's' / 'teacher'} failed: teacher: loss became")
                   for row in rows), rows
        assert "Failed cells:" in (tmp_path / "s" / "table.md").read_text()


def test_ray_missing_is_one_line_naming_the_extra(tmp_path, cli_runner, monkeypatch, fault_trials):
    with fault_trials("sweep_cell_fails").trial():
        monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
        line = one_line_error(cli_runner("sweep", QUICKSTART, "--grid", "method.name=kd", *set_args(ONE_THREAD),
                                         "--out", tmp_path / "s", "--executor", "ray", "--no-progress"))
        assert "pip install 'kdtool[ray]'" in line, line


@pytest.mark.parametrize("settings,culprit", [
    ({"name": "serial", "address": "auto"}, "address is a setting of the ray executor"),
    ({"name": "dask"}, "executor.name"),
    ({"name": "ray", "gpus_per_cell": -1}, "executor.gpus_per_cell"),
    ({"name": "ray", "cpus_per_cell": 0}, "executor.cpus_per_cell"),
    ({"name": "ray", "max_retries": 10**9}, "executor.max_retries"),
])
def test_bad_executor_settings_are_one_line(tmp_path, cli_runner, fault_trials, settings, culprit):
    import yaml

    with fault_trials("sweep").trial():
        spec = {"recipe": str(QUICKSTART), "out": str(tmp_path / "out"), "grid": {"method.name": ["kd"]},
                "set": {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in ONE_THREAD)}, "executor": settings}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        line = one_line_error(cli_runner("sweep", tmp_path / "spec.yaml", "--no-progress"))
        assert culprit in line, line
        assert not (tmp_path / "out").exists()


def test_a_cell_larger_than_the_cluster_is_refused(local_ray, tmp_path, fault_trials):
    from kdtool.errors import KdtoolError

    with fault_trials("sweep").trial():
        with pytest.raises(KdtoolError, match="gpus_per_cell: each cell asks for 1 GPU, the Ray cluster has 0"):
            run_sweep(QUICKSTART, GRID, seeds=1, overrides=ONE_THREAD, out=tmp_path / "s", progress=False,
                      executor=ExecutorConfig(name="ray", gpus_per_cell=1))


@pytest.mark.slow
def test_ctrl_c_cancels_outstanding_cells_and_keeps_finished_ones(tmp_path, fault_trials):
    trials = fault_trials("sweep_ctrl_c")
    with trials.trial():
        out = tmp_path / "sweep"
        args = [sys.executable, "-m", "kdtool.cli", "sweep", str(QUICKSTART), "--grid", "method.name=kd,ccd",
                "--seeds", "3", *set_args(ONE_THREAD), "--out", str(out), "--executor", "ray", "--no-progress"]
        driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        deadline = time.monotonic() + 300
        while not (out / "results.csv").exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the reports are written as soon as the first cell ends
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
        assert driver.returncode == 130, stderr[-3000:]
        assert "stopped by SIGINT" in stderr_error(stderr) and "finished cells kept" in stderr
        finished = {p.parent.name: p.read_text() for p in out.glob(f"*/{SUMMARY_FILE}")}
        assert finished and len(finished) < 6
        reported = [Path(row["run_dir"]).name for row in csv.DictReader(open(out / "results.csv"))]
        assert reported and set(reported) <= set(finished), (reported, finished)
        cells = sorted(p for p in out.glob("method.name=*") if p.is_dir())
        assert all(not lock_holders(cell) for cell in cells), "a cancelled task still runs"
        rows = run_sweep(QUICKSTART, {"method.name": ["kd", "ccd"]}, seeds=3, overrides=ONE_THREAD, out=out,
                         progress=False)
        assert all(row["status"] == "ok" for row in rows), [(row["run_dir"], row["reason"]) for row in rows if row["status"] != "ok"]
        assert {name: (out / name / SUMMARY_FILE).read_text() for name in finished} == finished  # reused as they were
