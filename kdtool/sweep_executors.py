"""Where a sweep's teachers and cells run: one after another in this process (serial), or as Ray tasks.

Both executors take the same jobs and report each cell's `Outcome` as the cell ends, so the
table, CSV and plot `run_sweep` writes do not depend on where the cells ran. A cell that fails
(a diverging loss, a model that cannot take the data) is an outcome with its one-line reason; the
other cells go on. A cell whose run directory holds a checkpoint resumes from it (kdtool's exact
resume), so a cell retried after its worker died ends as an uninterrupted cell would.

Ray (``pip install 'kdtool[ray]'``; the calls below are Ray 2.x's, checked against Ray 2.60):
every cell is a task with ``num_cpus`` / ``num_gpus`` from the executor settings and
``max_retries`` for workers that die; a cell depends on its teacher's task through the teacher's
ObjectRef, so Ray schedules it once that teacher is trained; results are collected with
``ray.wait`` as they arrive; Ctrl-C cancels what is outstanding (``ray.cancel``), and cells that
finished keep their run directories.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdtool.data import build_datasets
from kdtool.errors import Interrupted, KdtoolError, Registry
from kdtool.models import build_model
from kdtool.recipe import Recipe, dump_recipe
from kdtool.rundir import LAST, run_recipe, summary

FAILED = "failed"


class ExecutorConfig(BaseModel):
    """Where a sweep runs (the ``executor`` section of a sweep spec, or ``--executor`` / ``--address``)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["serial", "ray"] = Field("serial", description="serial: in this process; ray: cells as Ray tasks")
    address: Optional[str] = Field(None, min_length=1, max_length=1000,
                                   description="a running Ray cluster ('auto', 'host:6379', 'ray://host:10001'); "
                                               "null starts a local Ray with this machine's cores")
    cpus_per_cell: float = Field(1, gt=0, le=1024, description="CPUs Ray reserves for each cell and teacher")
    gpus_per_cell: float = Field(0, ge=0, le=64, description="GPUs Ray reserves for each cell and teacher")
    max_retries: int = Field(3, ge=0, le=100, description="runs again of a task whose worker died")

    @model_validator(mode="after")
    def _ray_settings_need_ray(self):
        if self.name != "ray":
            given = [key for key in ("address", "cpus_per_cell", "gpus_per_cell", "max_retries")
                     if key in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]} is a setting of the ray executor (name: ray)")
        return self


def executor_config(settings: Mapping, base: Optional[ExecutorConfig] = None) -> ExecutorConfig:
    """`base` (a spec's executor section) with `settings` (from the command line) replacing its keys."""
    given = {**(base.model_dump(exclude_unset=True) if base else {}), **settings}
    try:
        return ExecutorConfig.model_validate(given)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(["executor", *(str(part) for part in error["loc"])])
        raise KdtoolError(f"{key}: {error['msg'].lower().removeprefix('value error, ')}") from None


@dataclass(frozen=True)
class TeacherJob:
    """A shared teacher to train (or resume, or find finished) in `directory`."""

    directory: Path
    recipe: Recipe


@dataclass(frozen=True)
class CellJob:
    """One cell to distil into `run_dir`; `teacher` is the planned teacher directory it waits for."""

    index: int
    name: str
    recipe: Recipe
    run_dir: Path
    teacher: Optional[Path]


@dataclass(frozen=True)
class Outcome:
    """How a cell ended: its run summary, or the one-line reason it failed."""

    index: int
    result: Optional[dict]
    what: str  # "trained", "resumed", "done before" or FAILED
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.what == FAILED


Report = Callable[[Outcome], None]


# ------------------------------------------------------------------ one teacher, one cell
def train_shared_teacher(recipe: Recipe, teacher_dir: Path, progress: bool) -> None:
    """Train (or resume, or reuse when finished) the teacher of `recipe` in `teacher_dir`."""
    from accelerate.utils import set_seed

    from kdtool.train import build_accelerator, train_teacher

    datasets = build_datasets(recipe.data)
    set_seed(recipe.seed)  # the same initialisation as a single distill run of this recipe
    teacher = build_model(recipe.teacher.name, datasets.info.num_classes, image_size=datasets.info.image_size)
    train_teacher(recipe, teacher, datasets, teacher_dir, build_accelerator(recipe.runtime),
                  resume=(teacher_dir / LAST).exists(), progress=progress)


def finished_summary(recipe: Recipe, run_dir: Path) -> Optional[dict]:
    """The summary of a cell that finished with `recipe`, None when it has not; a cell finished with
    another recipe is refused (bad input: the sweep directory holds another sweep's cell)."""
    finished = summary(run_dir)
    if finished is not None and dump_recipe(run_recipe(run_dir)) != dump_recipe(recipe):
        raise KdtoolError(f"sweep cell {run_dir} was run with another recipe than this sweep's; "
                          f"use another --out (or remove that cell to run it again)")
    return finished


def run_cell(recipe: Recipe, run_dir: Path, progress: bool) -> tuple[dict, str]:
    """Distil one cell: skip it when finished, resume it when started. (summary, what happened)."""
    from kdtool.train import distill

    finished = finished_summary(recipe, run_dir)
    if finished is not None:
        return finished, "done before"
    resume = (run_dir / LAST).exists()
    result = distill(recipe, run_dir, resume=resume, overwrite=not resume, progress=progress)
    return result, "resumed" if resume else "trained"


def failure_reason(exc: BaseException) -> str:
    """One line: a kdtool error's message, or any other error's type and message."""
    text = str(exc) if isinstance(exc, KdtoolError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def teacher_job_failure(job: TeacherJob, progress: bool) -> Optional[str]:
    """Train a shared teacher; None when it is trained, else why it failed (a signal still stops the sweep)."""
    try:
        train_shared_teacher(job.recipe, job.directory, progress)
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - the failure becomes the reason its cells report
        return f"its teacher {job.directory} failed: {failure_reason(exc)}"
    return None


def cell_job_outcome(job: CellJob, teacher_failure: Optional[str], progress: bool) -> Outcome:
    """Run one cell; any failure (not a signal) is its outcome rather than the sweep's end."""
    if teacher_failure:
        return Outcome(job.index, None, FAILED, teacher_failure)
    try:
        result, what = run_cell(job.recipe, job.run_dir, progress)
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - reported in the table; the other cells go on
        return Outcome(job.index, None, FAILED, failure_reason(exc))
    return Outcome(job.index, result, what)


# ------------------------------------------------------------------ executors
def run_serial(teachers: list[TeacherJob], cells: list[CellJob], config: ExecutorConfig, progress: bool,
               report: Report) -> None:
    """Teachers first, then every cell, in this process."""
    failures = {job.directory: teacher_job_failure(job, progress) for job in teachers}
    for job in cells:
        report(cell_job_outcome(job, failures.get(job.teacher), progress))


def _import_ray():
    try:
        import ray
    except ImportError:
        raise KdtoolError("the ray executor needs Ray, which is not installed: pip install 'kdtool[ray]'") from None
    return ray


def _start_ray(ray, config: ExecutorConfig) -> None:
    """Connect to the cluster at `config.address` (or $RAY_ADDRESS), or start a local Ray on this machine's cores."""
    address = config.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise KdtoolError(f"executor: cannot start or reach {where}: {failure_reason(exc)}") from None


def _check_resources(ray, config: ExecutorConfig) -> None:
    """Refuse a cell larger than the whole cluster: Ray would wait for it forever."""
    available = ray.cluster_resources()
    for key, resource in (("cpus_per_cell", "CPU"), ("gpus_per_cell", "GPU")):
        wanted = getattr(config, key)
        if wanted > available.get(resource, 0):
            raise KdtoolError(f"executor.{key}: each cell asks for {wanted:g} {resource}, the Ray cluster has "
                              f"{available.get(resource, 0):g}")


def _ray_teacher_task(job: TeacherJob, cwd: str) -> Optional[str]:
    _enter(cwd)
    return teacher_job_failure(job, progress=False)


def _ray_cell_task(job: CellJob, teacher_failure: Optional[str], cwd: str) -> Outcome:
    _enter(cwd)
    return cell_job_outcome(job, teacher_failure, progress=False)


def _enter(cwd: str) -> None:
    """Work where the sweep was started when that directory is here (relative data roots stay valid)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)


def run_ray(teachers: list[TeacherJob], cells: list[CellJob], config: ExecutorConfig, progress: bool,
            report: Report) -> None:
    """Teachers and cells as Ray tasks, each cell after its teacher; outcomes reported as they arrive."""
    ray = _import_ray()
    started_here = not ray.is_initialized()  # a library user's own Ray session is used and left running
    if started_here:
        _start_ray(ray, config)
    try:
        _check_resources(ray, config)
        options = {"num_cpus": config.cpus_per_cell, "num_gpus": config.gpus_per_cell,
                   "max_retries": config.max_retries, "retry_exceptions": False}
        teacher_task = ray.remote(_ray_teacher_task).options(**options)
        cell_task = ray.remote(_ray_cell_task).options(**options)
        cwd = os.getcwd()  # paths go to the workers absolute, for nodes where this directory does not exist
        teacher_refs = {job.directory: teacher_task.remote(replace(job, directory=job.directory.absolute()), cwd)
                        for job in teachers}
        pending = {cell_task.remote(replace(job, run_dir=job.run_dir.absolute()), teacher_refs.get(job.teacher),
                                    cwd): job for job in cells}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                report(_ray_outcome(ray, done[0], job))
        except KeyboardInterrupt:
            for ref in [*pending, *teacher_refs.values()]:
                ray.cancel(ref, force=True)  # a finished task is left as it is
            raise Interrupted(f"sweep: stopped by SIGINT; {len(pending)} cell(s) cancelled, finished cells kept; "
                              "run the sweep again to continue", signal.SIGINT) from None
    finally:
        if started_here:
            ray.shutdown()


def _ray_outcome(ray, ref, job: CellJob) -> Outcome:
    """The outcome a cell task returned, or a failed one when Ray could not run it (retries used up)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        reason = failure_reason(cause) if isinstance(cause, BaseException) else type(exc).__name__
        return Outcome(job.index, None, FAILED, f"Ray could not run the cell: {reason}")


EXECUTORS = Registry("sweep executor", {"serial": run_serial, "ray": run_ray})
