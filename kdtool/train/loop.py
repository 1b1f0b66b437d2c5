"""The training loop, in the pieces torchvision's reference script and Accelerate's examples use:
`train_one_epoch`, `evaluate`, and `fit`'s short epoch loop over them. What changes from step to
step lives in a `TrainState` that is passed along; checkpointing and resuming are in `state`,
signal handling in `signals`, tracker logging in `tracking`.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from kdtool.augment import TrainViews
from kdtool.data import Datasets, SeededSamples, build_loader, unreadable_flags
from kdtool.errors import KdtoolError
from kdtool.evaluate import classification_metrics, predict
from kdtool.losses import LossFn
from kdtool.progress import progress
from kdtool.recipe import DataConfig, RuntimeConfig, TrainConfig
from kdtool.rundir import BEST, LAST, METRICS_FILE, has_checkpoint, read_state
from kdtool.train.setup import build_optimizer, build_scheduler, epoch_seed
from kdtool.train.signals import StopRequest, interrupted, stop_on_signals
from kdtool.train.state import TrainState, diverged, restore_rng, resume_state, rng_snapshot, save_state, start_fresh
from kdtool.train.step import Teacher, TrainStep
from kdtool.train.sync_bn import sync_batchnorm
from kdtool.train.tracking import log_values


@dataclass(frozen=True)
class Plan:
    """What every epoch of one `fit` shares."""

    label: str  # "teacher" or "student": names the progress bar, messages and tracker values
    out_dir: Path
    epochs: int
    batches_per_epoch: int
    total_steps: float  # epochs x steps per epoch, or train.max_steps when that is smaller
    log_every: int  # optimizer steps between loss checks / tracker records
    log_step_offset: int  # added to the step for trackers (the student's steps follow the teacher's)
    progress: bool


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    train_set: SeededSamples  # its set_epoch reseeds per-sample randomness
    unreadable_train: Optional[torch.Tensor]  # flags of images skipped as unreadable (data.bad_images: skip)
    unreadable_val: Optional[torch.Tensor]


@dataclass
class EpochRun:
    """What `train_one_epoch` did: loss-part sums over its batches, how many batches, whether a signal stopped it."""

    sums: dict
    batches: int
    stopped: bool = False


@dataclass
class FitResult:
    best: dict
    last: dict
    out_dir: Path


@dataclass(frozen=True)
class TeacherReference:
    """The frozen teacher's validation logits and metrics, computed once per `fit`."""

    logits: torch.Tensor
    metrics: dict


def train_one_epoch(trainer: TrainStep, loaders: Loaders, plan: Plan, state: TrainState, stop: StopRequest) -> EpochRun:
    """Train epoch `state.epoch` (from where a signal stopped it, if it did), advancing `state.step`.

    Ends early at `plan.total_steps`, or at the first step boundary after a signal.
    """
    accelerator, device = trainer.accelerator, trainer.accelerator.device
    resumed, state.mid_epoch = state.mid_epoch, {}
    set_seed(epoch_seed(trainer.seed, state.epoch))
    loaders.train.set_epoch(state.epoch)
    loaders.train_set.set_epoch(state.epoch)  # Accelerate forwards set_epoch to the dataset on one process only
    skip = resumed.get("batches", 0)
    run = EpochRun({name: torch.tensor(resumed_sum(value, accelerator), device=device)
                    for name, value in resumed.get("sums", {}).items()}, skip)
    if loaders.unreadable_train is not None:
        loaders.unreadable_train.zero_()
        loaders.unreadable_train[resumed.get("unreadable_images", [])] = True
    trainer.model.train()
    bar = progress(skip_first_batches(loaders.train, skip) if skip else loaders.train, initial=skip,
                   total=plan.batches_per_epoch, desc=f"{plan.label} {state.epoch + 1}/{plan.epochs}",
                   enabled=plan.progress and accelerator.is_local_main_process)
    rng = resumed.get("rng")
    for i, (images, targets) in enumerate(bar, start=skip):
        if rng is not None:  # the first batch after a mid-epoch checkpoint: dropout draws continue from it
            restore_rng(rng, device)
            rng = None
        syncing = (i + 1) % trainer.train_cfg.grad_accum == 0 or i + 1 == plan.batches_per_epoch
        parts = trainer(images, targets, state.step, syncing)
        for name, value in parts.items():
            run.sums[name] = run.sums.get(name, 0) + value.detach()
        state.step += syncing
        run.batches, run.stopped = i + 1, syncing and stop.agreed(accelerator)
        to_trackers = syncing and state.step % plan.log_every == 0
        if to_trackers or run.batches == plan.batches_per_epoch or run.stopped:
            check_step(parts, trainer, plan, state, bar, to_trackers)
        if run.stopped or state.step >= plan.total_steps:
            break
    bar.close()
    return run


def resumed_sum(saved, accelerator: Accelerator) -> float:
    """This process's share of a loss sum a mid-epoch checkpoint saved (one per process; a single number before).

    With another number of processes than saved, the main process carries the whole sum."""
    if not isinstance(saved, list):
        return saved
    if len(saved) == accelerator.num_processes:
        return saved[accelerator.process_index]
    return sum(saved) if accelerator.is_main_process else 0.0


def check_step(parts: dict, trainer: TrainStep, plan: Plan, state: TrainState, bar, to_trackers: bool) -> None:
    """Stop on a non-finite loss; show the loss and lr on the bar and, when due, send the loss parts and lr to the trackers."""
    loss = parts["loss"].item()
    if not math.isfinite(loss):
        raise diverged(plan.label, f"loss became {loss}", state.epoch + 1, state.step, plan.out_dir)
    lr = trainer.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
    if to_trackers and trainer.accelerator.trackers:
        values = {f"step/{name}": value.item() for name, value in parts.items()}
        log_values(trainer.accelerator, plan.label, {**values, "step/lr": lr}, plan.log_step_offset + state.step)


def evaluate(model: nn.Module, loaders: Loaders, trainer: TrainStep, runtime: RuntimeConfig,
             teacher_val: Optional[TeacherReference] = None) -> dict:
    """Validation metrics of `model` (`val_*`), with its agreement with the teacher and the teacher's own metrics."""
    logits, targets = predict(model, loaders.val, trainer.info, trainer.accelerator, channels_last=runtime.channels_last)
    record = {f"val_{k}": v for k, v in
              classification_metrics(logits, targets, teacher_val.logits if teacher_val else None).items()}
    if teacher_val is not None:
        record.update({f"teacher_val_{k}": v for k, v in teacher_val.metrics.items()})
    if loaders.unreadable_val is not None:
        record["skipped_val_images"] = int(loaders.unreadable_val.sum())
    return record


def teacher_reference(teacher: Optional[Teacher], loaders: Loaders, trainer: TrainStep,
                      runtime: RuntimeConfig) -> Optional[TeacherReference]:
    if teacher is None:
        return None
    logits, targets = predict(teacher.model, loaders.val, trainer.info, trainer.accelerator,
                              channels_last=runtime.channels_last)
    return TeacherReference(logits, classification_metrics(logits, targets))


def end_epoch(trainer: TrainStep, loaders: Loaders, plan: Plan, state: TrainState, run: EpochRun, *,
              runtime: RuntimeConfig, eval_every: int, teacher_val: Optional[TeacherReference], started: float) -> dict:
    """Summarise, evaluate (when due), checkpoint and publish the epoch `run` finished; returns its record."""
    train_seconds = time.perf_counter() - started
    accelerator = trainer.accelerator
    finished = state.epoch + 1 == plan.epochs or state.step >= plan.total_steps
    record = {"stage": plan.label, "epoch": state.epoch + 1, "step": state.step, "lr": trainer.scheduler.get_last_lr()[0]}
    # The world size every process saw (a launcher that started fewer processes than asked shows here).
    record["world_sizes"] = accelerator.gather(torch.tensor([accelerator.num_processes], device=accelerator.device)).tolist()
    # Each process summed its share of every batch; the record holds the mean over all of them.
    record.update({f"train_{k}": (accelerator.reduce(v, "mean") / run.batches).item() for k, v in run.sums.items()})
    if loaders.unreadable_train is not None:
        record["skipped_images"] = int(loaders.unreadable_train.sum())
    evaluated = (state.epoch + 1) % eval_every == 0 or finished
    if evaluated:
        record.update(evaluate(trainer.model, loaders, trainer, runtime, teacher_val))
    record["train_seconds"] = round(train_seconds, 3)
    record["epoch_seconds"] = round(time.perf_counter() - started, 3)
    is_best = evaluated and record["val_top1"] > state.best_top1
    state.best_top1 = record["val_top1"] if is_best else state.best_top1
    save_state(plan.out_dir, trainer, state, {"epoch": state.epoch + 1, "rng": {"epoch_seed": epoch_seed(trainer.seed, state.epoch),
               "jda_seed": trainer.seed}, "finished": finished, "metrics": record}, label=plan.label, is_best=is_best)
    if accelerator.is_main_process:
        publish(record, plan, accelerator, evaluated)
    accelerator.wait_for_everyone()
    state.epoch, state.last_record = state.epoch + 1, record
    return record


def save_mid_epoch(trainer: TrainStep, loaders: Loaders, plan: Plan, state: TrainState, run: EpochRun) -> None:
    """Checkpoint an epoch a signal stopped: where it stopped, its loss sums so far and torch's RNG."""
    # Every process's own sums (the epoch's record averages them), so each resumes from its own.
    sums = {k: trainer.accelerator.gather(v.reshape(1)).tolist() for k, v in run.sums.items()}
    mid_epoch = {"batches": run.batches, "sums": sums, "rng": rng_snapshot(trainer.accelerator.device)}
    if loaders.unreadable_train is not None:
        mid_epoch["unreadable_images"] = loaders.unreadable_train.nonzero().flatten().tolist()
    save_state(plan.out_dir, trainer, state, {"epoch": state.epoch, "mid_epoch": mid_epoch, "finished": False,
                                              "metrics": state.last_record}, label=plan.label)


def publish(record: dict, plan: Plan, accelerator: Accelerator, evaluated: bool) -> None:
    """An epoch's record to metrics.jsonl, the trackers and the console (main process)."""
    with open(plan.out_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    log_values(accelerator, plan.label, {f"epoch/{k}": v for k, v in record.items() if k != "step"},
               plan.log_step_offset + record["step"])
    label, epoch = plan.label, record["epoch"]
    if evaluated:
        shown = ", ".join(f"{k}={v:.2f}" for k, v in record.items() if k.startswith("val_"))
        tqdm.write(f"{label} epoch {epoch}/{plan.epochs}: loss={record['train_loss']:.4f} {shown}")
    if record.get("skipped_images") or record.get("skipped_val_images"):
        tqdm.write(f"{label} epoch {epoch}: skipped {record.get('skipped_images', 0)} unreadable training image(s)"
                   f" and {record.get('skipped_val_images', 0)} validation image(s) (data.bad_images: skip)")


def prepare(model: nn.Module, datasets: Datasets, loss_fn: LossFn, *, train_cfg: TrainConfig, data_cfg: DataConfig,
            runtime: RuntimeConfig, accelerator: Accelerator, seed: int, teacher: Optional[Teacher],
            train_views: Optional[TrainViews]) -> tuple[TrainStep, Loaders]:
    """Loaders, optimizer and schedule for `model`, everything placed and wrapped by the accelerator."""
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    in_loader = (train_views or TrainViews(None, 0, seed)).loader_views(accelerator.device)
    train_set = SeededSamples(datasets.train, seed, in_loader=in_loader)
    train_views = (train_views or TrainViews(None, 0, seed)).reading(datasets.train)
    train_loader = build_loader(train_set, data_cfg, train=True)
    val_loader = build_loader(datasets.val, data_cfg, train=False)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise KdtoolError(f"data.batch_size: {data_cfg.batch_size} is larger than the {len(datasets.train)} training images")
    set_seed(seed)  # the sampler's base seed is read from torch's seed in prepare()
    model = model.to(memory_format=memory_format)
    if runtime.sync_batchnorm and accelerator.num_processes > 1:
        model = sync_batchnorm(model, accelerator.device)
    optimizer = build_optimizer(model, train_cfg.optimizer)
    steps_per_epoch = math.ceil(batches_per_epoch / train_cfg.grad_accum)
    scheduler = build_scheduler(optimizer, train_cfg, steps_per_epoch)
    if runtime.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if teacher is not None:  # frozen and not wrapped for DDP: it is never trained here
        frozen = teacher.model.to(accelerator.device, memory_format=memory_format).eval().requires_grad_(False)
        teacher = replace(teacher, model=frozen)
    trainer = TrainStep(model, optimizer, scheduler, loss_fn, accelerator, datasets.info, train_cfg, seed,
                        steps_per_epoch, memory_format, teacher, train_views)
    return trainer, Loaders(train_loader, val_loader, train_set, unreadable_flags(datasets.train), unreadable_flags(datasets.val))


def fit(model: nn.Module, datasets: Datasets, *, loss_fn: LossFn, train_cfg: TrainConfig, data_cfg: DataConfig,
        runtime: RuntimeConfig, accelerator: Accelerator, out_dir: Path, seed: int, teacher: Optional[Teacher] = None,
        train_views: Optional[TrainViews] = None, resume: bool = False, label: str = "student", progress: bool = True,
        log_step_offset: int = 0, stop: Optional[StopRequest] = None) -> FitResult:
    """Train `model` with `loss_fn`, evaluating, logging and checkpointing into `out_dir`.

    `resume` continues from `out_dir/last` when there is one. SIGINT/SIGTERM save a checkpoint at
    the next step boundary and raise `Interrupted` on every process at the same step; `stop` is the
    caller's `stop_on_signals` request when its handlers span more than this fit (None: this fit's
    own). A non-finite loss or weights raise `CheckFailed`.
    """
    out_dir = Path(out_dir)
    trainer, loaders = prepare(model, datasets, loss_fn, train_cfg=train_cfg, data_cfg=data_cfg, runtime=runtime,
                               accelerator=accelerator, seed=seed, teacher=teacher, train_views=train_views)
    batches = len(loaders.train)
    plan = Plan(label, out_dir, train_cfg.epochs, batches, min(train_cfg.epochs * trainer.steps_per_epoch,
                train_cfg.max_steps or math.inf), runtime.log_every, log_step_offset, progress)
    if resume and has_checkpoint(out_dir):
        state = resume_state(out_dir, trainer)
    else:
        state = start_fresh(out_dir, accelerator.is_main_process)
    teacher_val = teacher_reference(trainer.teacher, loaders, trainer, runtime)
    with contextlib.nullcontext(stop) if stop is not None else stop_on_signals() as stop:
        while state.epoch < plan.epochs and state.step < plan.total_steps:
            started = time.perf_counter()
            run = train_one_epoch(trainer, loaders, plan, state, stop)
            if run.stopped and run.batches < batches:
                save_mid_epoch(trainer, loaders, plan, state, run)
                accelerator.wait_for_everyone()  # no process leaves (and its launcher stops the rest) before the save
                raise interrupted(stop.signum, label, f"at epoch {state.epoch + 1}, batch {run.batches}/{batches}",
                                  state.step, str(out_dir / LAST))
            end_epoch(trainer, loaders, plan, state, run, runtime=runtime, eval_every=train_cfg.eval_every,
                      teacher_val=teacher_val, started=started)
            if stop.agreed(accelerator):
                raise interrupted(stop.signum, label, f"after epoch {state.epoch}", state.step, str(out_dir / LAST))
        if stop.agreed(accelerator):  # a signal after the last epoch's check: the run is saved, stop before the next
            raise interrupted(stop.signum, label, "at its end", state.step, str(out_dir / LAST))
    best = read_state(out_dir / BEST) if (out_dir / BEST).exists() else {}
    return FitResult(best=best.get("metrics", {}), last=state.last_record, out_dir=out_dir)
