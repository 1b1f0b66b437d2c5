"""`run_bench`: time every artefact on every available runtime, measure accuracy, apply the gate, report.

Accuracy rests, by default, on the bundle's own reference set (validation images, labels, teacher and
float-student logits saved at export), so a bundle copied to another machine benches without its run.
With `data` (a dataset root) and the training run present, the whole validation set is used instead.
Every artefact goes through one batched runner (`kdtool.export.runner.batched_logits`).

An artefact/runtime pair is skipped only when the runtime is not available here, or, for the FP16 ONNX on
ONNX Runtime's CPU provider, when export already found that provider cannot run it; anything else that
stops a case is a failure (exit 1, after the report is written), among them a runtime that did not get
its provider (kdtool.bench.ort_runner). The gate names what it checked and what it could not check here;
it never passes over an artefact it did not check, nor when the teacher is at chance on the data.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from kdtool.bench.accuracy import (
    GateFailed, accuracy_row, format_failures, gate_failures, reference_row, teacher_failures,
)
from kdtool.bench.eval_set import EvalSet, reference_eval_set, run_eval_set
from kdtool.bench.loading import Artefact, Bundle, load_bundle
from kdtool.bench.report import build_report, write_report
from kdtool.bench.runtimes import RUNTIMES, RunnerOptions, Runtime
from kdtool.bench.timing import latency_stats, measure
from kdtool.bundle import BundleMismatch, bundle_lock
from kdtool.errors import KdtoolError
from kdtool.export.runner import batched_logits
from kdtool.progress import progress
from kdtool.recipe import BenchConfig

ROTATING_BATCHES = 8  # distinct real batches cycled through while timing, so no single input is cached hot


@dataclass(frozen=True)
class BenchSettings:
    """What one bench run does: the recipe's bench section with the caller's overrides applied."""

    batch_sizes: tuple[int, ...]
    warmup: int
    iters: int | None
    duration: float | None
    threads: int
    include_copies: bool
    cuda_graphs: bool


def resolve_settings(bench: BenchConfig, *, batch_sizes=None, iters=None, duration=None, threads=None,
                     include_copies=None, cuda_graphs=None) -> BenchSettings:
    """Arguments given (not None) win over the recipe; a duration replaces the iteration count."""
    if iters is not None and duration is not None:
        raise KdtoolError("give an iteration count or a duration, not both")
    sizes = tuple(batch_sizes or bench.batch_sizes)
    if not sizes or any(size < 1 for size in sizes):
        raise KdtoolError(f"batch sizes must be positive integers, got {list(sizes)}")
    if iters is None and duration is None:
        iters, duration = (None, bench.duration) if bench.duration is not None else (bench.iters, None)
    if (iters is not None and iters < 1) or (duration is not None and duration <= 0):
        raise KdtoolError("iterations and duration must be positive")
    resolved_threads = threads or bench.threads or torch.get_num_threads()
    if resolved_threads < 1:
        raise KdtoolError(f"threads must be positive, got {resolved_threads}")
    return BenchSettings(
        batch_sizes=tuple(sorted(set(sizes))), warmup=bench.warmup, iters=iters, duration=duration,
        threads=resolved_threads,
        include_copies=bench.include_copies if include_copies is None else include_copies,
        cuda_graphs=bench.cuda_graphs if cuda_graphs is None else cuda_graphs,
    )


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------ running the cases
@dataclass
class Outcome:
    """What happened to every artefact/runtime pair."""

    cases: list = dataclasses.field(default_factory=list)  # (artefact, runtime, runner) that opened
    skipped: list[dict] = dataclasses.field(default_factory=list)  # not available here: not a failure
    failed: list[dict] = dataclasses.field(default_factory=list)  # could not run: a failure

    def fail(self, artefact: Artefact, runtime: Runtime, exc: Exception, **where) -> None:
        self.failed.append({"artefact": artefact.key, "runtime": runtime.name, **where, "reason": _first_line(exc)})


def _runtime_status(runtimes: Mapping[str, Runtime]) -> list[dict]:
    return [{"name": runtime.name, "available": (reason := runtime.unavailable_reason()) is None, "reason": reason}
            for runtime in runtimes.values()]


def _open_cases(artefacts: list[Artefact], runtimes: Mapping[str, Runtime], statuses: list[dict],
                options: RunnerOptions, outcome: Outcome) -> None:
    """Open every artefact on every runtime that serves its target; skip only what is not installed here.
    A runtime that cannot open an artefact it serves (its provider not obtained, a file it cannot load)
    fails that case."""
    for status in statuses:
        runtime = runtimes[status["name"]]
        for artefact in (a for a in artefacts if runtime.runs(a)):
            if not status["available"]:
                outcome.skipped.append({"artefact": artefact.key, "runtime": runtime.name, "reason": status["reason"]})
            elif artefact.unverified and runtime.name == "ort-cpu":
                outcome.skipped.append({"artefact": artefact.key, "runtime": runtime.name,
                                        "reason": f"export found: {artefact.unverified}"})
            else:
                try:
                    outcome.cases.append((artefact, runtime, runtime.open(artefact, options)))
                except BundleMismatch:
                    raise  # the bundle does not fit its manifest (names, shapes, engine target): exit 2
                except Exception as exc:  # noqa: BLE001  a runtime that cannot load an artefact it serves
                    outcome.fail(artefact, runtime, exc, stage="open")


def _accuracy(eval_set: EvalSet, outcome: Outcome) -> list[dict]:
    rows = [reference_row("teacher", eval_set.reference_runtime, eval_set.teacher_logits, eval_set.labels),
            reference_row("student", eval_set.reference_runtime, eval_set.student_logits, eval_set.labels)]
    for case in list(outcome.cases):
        artefact, runtime, runner = case
        try:
            logits = batched_logits(runner.predict, eval_set.batches(), runner.max_batch)
        except Exception as exc:  # noqa: BLE001  recorded as a failure, the report still written
            outcome.fail(artefact, runtime, exc, stage="accuracy")
            outcome.cases.remove(case)
            continue
        rows.append(accuracy_row(artefact.key, artefact.precision, runtime.name, runner.ran_on, logits, eval_set.labels,
                                 eval_set.teacher_logits, eval_set.student_logits))
    return rows


def _rotating_batches(pool: np.ndarray, batch_size: int) -> list[np.ndarray]:
    count = min(ROTATING_BATCHES, max(1, len(pool) // batch_size))
    return [pool[np.arange(i * batch_size, (i + 1) * batch_size) % len(pool)] for i in range(count)]


def _time_all(outcome: Outcome, settings: BenchSettings, pool: np.ndarray, show: bool) -> list[dict]:
    """Latency statistics of every timed case at every batch size, on rotating real inputs staged
    beforehand; with `show`, progress per case (a bar on a terminal, a line per case in a log)."""
    timed = [(artefact, runtime, runner, size) for artefact, runtime, runner in outcome.cases if runtime.timed
             for size in settings.batch_sizes]
    timing = []
    cases = progress(timed, desc="timing", total=len(timed), enabled=show, every=1)
    for artefact, runtime, runner, size in cases:
        cases.set_postfix(case=f"{artefact.key} on {runtime.name}, batch {size}")
        if runner.max_batch is not None and size > runner.max_batch:
            outcome.skipped.append({"artefact": artefact.key, "runtime": runtime.name, "batch_size": size,
                                    "reason": f"batch {size} above the engine's maximum {runner.max_batch}"})
            continue
        try:
            staged = [runner.stage(batch) for batch in _rotating_batches(pool, size)]
            durations = measure(runner.run, staged, warmup=settings.warmup, iters=settings.iters,
                                duration=settings.duration)
        except Exception as exc:  # noqa: BLE001  a failure, reported
            outcome.fail(artefact, runtime, exc, stage="timing", batch_size=size)
            continue
        timing.append({
            "artefact": artefact.key, "precision": artefact.precision, "runtime": runtime.name,
            "ran_on": runner.ran_on, "batch_size": size, "threads": settings.threads,
            "include_copies": settings.include_copies if runtime.uses_gpu else None,
            "cuda_graphs": settings.cuda_graphs if runtime.name == "tensorrt" else None,
            **latency_stats(durations, size),
        })
    cases.close()
    return timing


def not_checked(bundle: Bundle, accuracy: list[dict], outcome: Outcome) -> dict[str, str]:
    """Artefacts of the bundle with no accuracy row here, and why."""
    checked = {row["artefact"] for row in accuracy}
    reasons = {}
    for artefact in bundle.artefacts:
        if artefact.key not in checked:
            why = [f"{s['runtime']}: {s['reason']}" for s in outcome.skipped + outcome.failed if s["artefact"] == artefact.key]
            reasons[artefact.key] = "; ".join(why) or "no runtime here serves its target"
    return reasons


def run_bench(bundle_dir: Path, *, batch_sizes: list[int] | None = None, iters: int | None = None,
              duration: float | None = None, threads: int | None = None, data: str | None = None,
              include_copies: bool | None = None, cuda_graphs: bool | None = None, progress: bool = True,
              runtimes: Mapping[str, Runtime] = RUNTIMES) -> dict:
    """Benchmark the bundle in `bundle_dir`: latency/throughput and accuracy of every artefact on every
    available runtime that serves its target, the recipe's accuracy gate, and report.{json,md,png}
    written into the bundle. Accuracy rests on the bundle's reference set, or with `data` (a dataset root)
    on that whole validation set, which needs the training run. `runtimes` (default: every registered
    one) are the runtimes to try.

    Returns the report; raises `GateFailed` (exit 1, after writing the report) when the gate fails or an
    artefact could not run on a runtime that serves it.
    """
    with bundle_lock(Path(bundle_dir)):
        bundle = load_bundle(Path(bundle_dir))
        settings = resolve_settings(bundle.recipe.bench, batch_sizes=batch_sizes, iters=iters, duration=duration,
                                    threads=threads, include_copies=include_copies, cuda_graphs=cuda_graphs)
        report, failures, outcome = _bench(bundle, settings, data, progress, runtimes)
        write_report(bundle.directory, report)
    if outcome.failed:
        cases = "; ".join(f"{f['artefact']} on {f['runtime']} ({f['stage']}): {f['reason']}" for f in outcome.failed)
        raise GateFailed(f"{len(outcome.failed)} case(s) could not run, so the gate cannot pass: {cases}", report)
    if failures:
        raise GateFailed(format_failures(failures), report)
    return report


def _bench(bundle: Bundle, settings: BenchSettings, data: str | None, progress: bool, runtimes: Mapping[str, Runtime]):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    statuses = _runtime_status(runtimes)
    outcome = Outcome()
    manifest = bundle.manifest
    options = RunnerOptions(bundle.input_name, bundle.output_name, settings.threads, settings.include_copies,
                            settings.cuda_graphs, tuple(manifest.input.shape[1:]), manifest.model.num_classes)
    with torch_threads(settings.threads):
        eval_set = run_eval_set(bundle, data, device) if data is not None else reference_eval_set(bundle)
        artefacts = list(bundle.artefacts)
        if eval_set.student is not None:
            artefacts.insert(0, Artefact("student", "fp32", "pytorch", model=eval_set.student))
        _open_cases(artefacts, runtimes, statuses, options, outcome)
        accuracy = _accuracy(eval_set, outcome)
        pool = eval_set.timing_pool(ROTATING_BATCHES * max(settings.batch_sizes))
        timing = _time_all(outcome, settings, pool, progress)
    unchecked = not_checked(bundle, accuracy, outcome)
    gated = {artefact.key for artefact in bundle.artefacts}
    failures = (teacher_failures(accuracy, len(eval_set.labels), manifest.model.num_classes)
                + gate_failures(accuracy, bundle.recipe.bench.gate, gated))
    report = build_report(bundle, settings, eval_set, statuses, timing, accuracy, outcome, failures, unchecked,
                          runtimes)
    return report, failures, outcome
