"""`run_bench`: time every artefact on every available runtime, measure accuracy, apply the gate, report."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtool.bench.accuracy import GateFailed, accuracy_row, format_failures, gate_failures, teacher_row
from kdtool.bench.bundle import Artefact, Bundle, load_bundle
from kdtool.bench.report import build_report, write_report
from kdtool.bench.runtimes import RUNTIMES, Runner, RunnerOptions, Runtime
from kdtool.bench.timing import latency_stats, measure
from kdtool.data import DataInfo, build_datasets, build_loader, normalize
from kdtool.errors import KdtoolError
from kdtool.recipe import BenchConfig, Recipe, load_recipe
from kdtool.rundir import load_student, load_teacher

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


def _data_info(bundle: Bundle, info: DataInfo, image_size: int) -> DataInfo:
    """The dataset's info with the bundle's preprocessing, which is what a deployment would apply."""
    pre = bundle.manifest["preprocessing"]
    if int(pre["image_size"]) != image_size:
        raise KdtoolError(f"{bundle.directory / 'manifest.json'}: preprocessing.image_size {pre['image_size']} "
                          f"differs from the recipe's data.image_size {image_size}")
    return dataclasses.replace(info, mean=tuple(pre["mean"]), std=tuple(pre["std"]))


def _open_runners(artefacts: list[Artefact], runtimes: list[Runtime], options: RunnerOptions, skipped: list[dict]):
    """(artefact, runtime, runner) for every artefact on every available runtime of its kind that opens it."""
    opened = []
    for runtime in runtimes:
        for artefact in artefacts:
            if artefact.kind != runtime.artefact_kind:
                continue
            try:
                opened.append((artefact, runtime, runtime.open(artefact, options)))
            except KdtoolError:
                raise
            except Exception as exc:  # a runtime that cannot run this artefact (unsupported op, dtype...) is a finding
                skipped.append({"artefact": artefact.key, "runtime": runtime.name, "reason": _first_line(exc)})
    return opened


def _predict(runner: Runner, batch: np.ndarray) -> np.ndarray:
    step = runner.max_batch or len(batch)
    return np.concatenate([runner.predict(batch[start:start + step]) for start in range(0, len(batch), step)])


def _rotating_batches(pool: np.ndarray, batch_size: int) -> list[np.ndarray]:
    count = min(ROTATING_BATCHES, max(1, len(pool) // batch_size))
    return [pool[np.arange(i * batch_size, (i + 1) * batch_size) % len(pool)] for i in range(count)]


@dataclass
class Predictions:
    """One pass over the validation set: labels, teacher logits, each runner's logits, and timing inputs."""

    targets: np.ndarray
    teacher: np.ndarray
    by_case: dict[tuple[str, str], np.ndarray]
    timing_pool: np.ndarray


def _predict_all(loader, info: DataInfo, teacher: torch.nn.Module, device: torch.device, runners: list,
                 pool_size: int, skipped: list[dict], bar) -> Predictions:
    """Feed every validation batch to the teacher and every runner; a runner that fails is dropped into `skipped`."""
    pool, targets, teacher_logits = [], [], []
    logits: dict[tuple[str, str], list[np.ndarray]] = {(a.key, rt.name): [] for a, rt, _ in runners}
    task = bar.add_task("accuracy", total=len(loader))
    for images, labels in loader:
        batch = normalize(images, info)
        with torch.inference_mode():
            teacher_logits.append(teacher(batch.to(device)).float().cpu().numpy())
        batch = batch.numpy()
        targets.append(labels.numpy())
        if sum(len(p) for p in pool) < pool_size:
            pool.append(batch)
        for case in list(runners):
            artefact, runtime, runner = case
            try:
                logits[artefact.key, runtime.name].append(_predict(runner, batch))
            except Exception as exc:  # a finding, as in _open_runners
                skipped.append({"artefact": artefact.key, "runtime": runtime.name, "reason": _first_line(exc)})
                runners.remove(case)
                del logits[artefact.key, runtime.name]
        bar.advance(task)
    if not targets:
        raise KdtoolError("the validation set is empty")
    return Predictions(np.concatenate(targets), np.concatenate(teacher_logits),
                       {key: np.concatenate(parts) for key, parts in logits.items()}, np.concatenate(pool)[:pool_size])


def _time_all(runners: list, settings: BenchSettings, pool: np.ndarray, skipped: list[dict], bar) -> list[dict]:
    """Latency statistics of every runner at every batch size, on rotating real inputs staged beforehand."""
    timing = []
    task = bar.add_task("timing", total=len(runners) * len(settings.batch_sizes))
    for artefact, runtime, runner in runners:
        for size in settings.batch_sizes:
            bar.update(task, description=f"timing {artefact.key} on {runtime.name}, batch {size}")
            bar.advance(task)
            if runner.max_batch is not None and size > runner.max_batch:
                skipped.append({"artefact": artefact.key, "runtime": runtime.name, "batch_size": size,
                                "reason": f"batch {size} above the engine's maximum {runner.max_batch}"})
                continue
            try:
                staged = [runner.stage(batch) for batch in _rotating_batches(pool, size)]
                durations = measure(runner.run, staged, warmup=settings.warmup, iters=settings.iters,
                                    duration=settings.duration)
            except Exception as exc:  # a finding, as in _open_runners
                skipped.append({"artefact": artefact.key, "runtime": runtime.name, "batch_size": size,
                                "reason": _first_line(exc)})
                continue
            timing.append({
                "artefact": artefact.key, "precision": artefact.precision, "runtime": runtime.name,
                "batch_size": size, "threads": settings.threads,
                "include_copies": settings.include_copies if runtime.uses_gpu else None,
                "cuda_graphs": settings.cuda_graphs if runtime.name == "tensorrt" else None,
                **latency_stats(durations, size),
            })
    return timing


def _runtime_status() -> list[dict]:
    status = []
    for runtime in RUNTIMES.values():
        reason = runtime.unavailable_reason()
        status.append({"name": runtime.name, "available": reason is None, "reason": reason})
    return status


def run_bench(bundle_dir: Path, *, batch_sizes: list[int] | None = None, iters: int | None = None,
              duration: float | None = None, threads: int | None = None, data: str | None = None,
              include_copies: bool | None = None, cuda_graphs: bool | None = None, progress: bool = True) -> dict:
    """Benchmark the bundle in `bundle_dir`: latency/throughput and accuracy of every artefact on every
    available runtime, the recipe's accuracy gate, and report.{json,md,png} written into the bundle.

    Arguments left as None come from the bundle recipe's `bench` section (`data` replaces `data.root`).
    Returns the report; raises `GateFailed` (a `CheckFailed`, exit 1) after writing it when the gate fails.
    """
    from rich.progress import Progress

    bundle = load_bundle(Path(bundle_dir))
    recipe: Recipe = load_recipe(bundle.directory / "recipe.yaml")
    data_cfg = recipe.data.model_copy(update={"root": str(data)}) if data is not None else recipe.data
    settings = resolve_settings(recipe.bench, batch_sizes=batch_sizes, iters=iters, duration=duration, threads=threads,
                                include_copies=include_copies, cuda_graphs=cuda_graphs)
    datasets = build_datasets(data_cfg)
    info = _data_info(bundle, datasets.info, data_cfg.image_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtimes = _runtime_status()
    skipped: list[dict] = []

    with torch_threads(settings.threads), Progress(disable=not progress, transient=True) as bar:
        teacher = load_teacher(bundle.run_dir, recipe, info.num_classes).to(device)
        student = load_student(bundle.run_dir, recipe, info.num_classes)
        artefacts = [Artefact("student", "fp32", "pytorch", model=student), *bundle.artefacts]
        for status in runtimes:
            if not status["available"]:
                skipped += [{"artefact": a.key, "runtime": status["name"], "reason": status["reason"]}
                            for a in artefacts if a.kind == RUNTIMES[status["name"]].artefact_kind]
        options = RunnerOptions(bundle.input_name, bundle.output_name, settings.threads,
                                settings.include_copies, settings.cuda_graphs)
        available = [RUNTIMES[status["name"]] for status in runtimes if status["available"]]
        runners = _open_runners(artefacts, available, options, skipped)
        predictions = _predict_all(build_loader(datasets.val, data_cfg, train=False), info, teacher, device, runners,
                                   ROTATING_BATCHES * max(settings.batch_sizes), skipped, bar)
        timing = _time_all(runners, settings, predictions.timing_pool, skipped, bar)

    student_logits = predictions.by_case["student", "pytorch-cpu"]
    accuracy = [teacher_row(f"pytorch-{device.type}", predictions.teacher, predictions.targets)]
    accuracy += [accuracy_row(a.key, a.precision, rt.name, predictions.by_case[a.key, rt.name], predictions.targets,
                              predictions.teacher, student_logits) for a, rt, _ in runners]
    failures = gate_failures(accuracy, recipe.bench.gate, {a.key for a in bundle.artefacts})
    report = build_report(bundle, recipe, settings, data_cfg, len(predictions.targets), runtimes, timing, accuracy,
                          skipped, failures)
    write_report(bundle.directory, report)
    if failures:
        raise GateFailed(format_failures(failures), report)
    return report
