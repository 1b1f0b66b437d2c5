"""The training loop on HF Accelerate: teacher training (CE) and distillation share it.

`distill(recipe, run_dir)` is the whole stage: train the teacher when the recipe names no teacher
weights, then distil the student. `fit(...)` is the loop itself, usable on its own with any model.
Device placement, DDP and mixed precision go through the `Accelerator` only, so the same code
runs on one CPU, one GPU or `accelerate launch` across GPUs and nodes.
"""
from __future__ import annotations

import base64
import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from kdtool.augment import TrainViews, build_train_views
from kdtool.checkpoint import load_training_state, save_checkpoint
from kdtool.data import DataInfo, Datasets, SeededSamples, build_datasets, build_loader, normalize, unreadable_flags
from kdtool.errors import CheckFailed, Interrupted, KdtoolError
from kdtool.evaluate import classification_metrics, predict
from kdtool.io import write_json_atomic, write_text_atomic
from kdtool.losses import LossFn, build_loss
from kdtool.models import build_model, load_weights, read_state_dict
from kdtool.recipe import DataConfig, MethodConfig, OptimizerConfig, Recipe, RuntimeConfig, TrainConfig, dump_recipe, load_recipe, save_recipe
from kdtool.rundir import (
    METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, check_run_target, claim, clear_run, has_checkpoint, has_content, is_finished,
    load_student, load_teacher, read_state, run_lock,
)

LOG_EVERY = 10


# ------------------------------------------------------------------ building blocks
def build_accelerator(runtime: RuntimeConfig) -> Accelerator:
    """One Accelerator per process; global batches are split across processes."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    return Accelerator(
        cpu=runtime.cpu,
        mixed_precision=runtime.mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
    )


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear warm-up, then the schedule."""
    schedule = cfg.schedule
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    epoch = step / steps_per_epoch
    if schedule.name == "multistep":
        return schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    if schedule.name == "cosine":
        total = cfg.epochs * steps_per_epoch
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        floor = schedule.min_lr / cfg.optimizer.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every RNG is reset to at the start of `epoch`: the state there depends on (seed, epoch) alone."""
    return seed * 1000 + epoch


class StopRequest:
    """SIGINT/SIGTERM seen during `fit`: the loop saves at the next step boundary, then stops."""

    def __init__(self):
        self.signum = 0

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was signalled; every process must call this at the same step."""
        if accelerator.num_processes > 1:
            seen = torch.tensor([self.signum], device=accelerator.device)
            self.signum = int(accelerator.gather(seen).max())
        return self.signum != 0


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a `StopRequest` for the block; a second signal stops at once, unsaved."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield request
        return

    def handler(signum, _frame):
        if request.signum:
            raise Interrupted(f"stopped by a second {signal.Signals(signum).name} before saving; "
                              "--resume continues from the last checkpoint", signum)
        request.signum = signum

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _rng_snapshot(device: torch.device) -> dict[str, str]:
    """torch's global RNG states (dropout draws from them), as JSON-friendly base64."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {name: base64.b64encode(state.numpy().tobytes()).decode() for name, state in states.items()}


def _restore_rng(snapshot: dict[str, str], device: torch.device) -> None:
    decode = lambda name: torch.frombuffer(bytearray(base64.b64decode(snapshot[name])), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode("cpu"))
    if device.type == "cuda" and "cuda" in snapshot:
        torch.cuda.set_rng_state(decode("cuda"), device)


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop records written after the checkpoint we resume from (a killed run may have left some)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------ the loop
@dataclass
class TrainStep:
    """One training step: JDA views, frozen-teacher logits, the loss, backward, and (when syncing) the update."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn
    accelerator: Accelerator
    info: DataInfo
    train_cfg: TrainConfig
    seed: int
    memory_format: torch.memory_format
    teacher: Optional[nn.Module] = None
    train_views: Optional[TrainViews] = None
    teacher_sees_views: bool = True

    @property
    def views(self) -> int:
        return self.train_views.views if self.train_views is not None else 0

    def inputs(self, images, step: int) -> torch.Tensor:
        """A loader batch -> the normalised joint batch [originals; view 1; ...] on the device."""
        views = self.train_views or TrainViews(None, 0, self.seed)
        return normalize(views(images, step, self.accelerator), self.info).contiguous(memory_format=self.memory_format)

    def teacher_logits(self, inputs: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        with torch.no_grad(), self.accelerator.autocast():
            if self.views and not self.teacher_sees_views:
                return self.teacher(inputs[:batch]).repeat(1 + self.views, 1)
            return self.teacher(inputs)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int, syncing: bool) -> dict:
        """Forward and backward one batch; the optimizer steps only when `syncing`. Returns the loss parts."""
        inputs = self.inputs(images, step)
        teacher_logits = self.teacher_logits(inputs, targets.shape[0])
        with contextlib.nullcontext() if syncing else self.accelerator.no_sync(self.model):
            parts = self.loss_fn(self.model(inputs), teacher_logits, targets, self.views)
            self.accelerator.backward(parts["loss"] / self.train_cfg.grad_accum)
        if syncing:
            if self.train_cfg.clip_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.train_cfg.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return parts


@dataclass
class FitResult:
    best: dict
    last: dict
    out_dir: Path


def fit(
    model: nn.Module,
    datasets: Datasets,
    *,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    runtime: RuntimeConfig,
    accelerator: Accelerator,
    out_dir: Path,
    seed: int,
    loss_fn: LossFn,
    teacher: Optional[nn.Module] = None,
    teacher_in_loss: bool = True,
    train_views: Optional[TrainViews] = None,
    teacher_sees_views: bool = True,
    resume: bool = False,
    label: str = "student",
    progress: bool = True,
) -> FitResult:
    """Train `model` with `loss_fn`, evaluating, logging and checkpointing into `out_dir`.

    A `teacher` is frozen; its logits feed `loss_fn` when `teacher_in_loss`, and evaluation always
    reports the student's agreement with it.
    """
    out_dir = Path(out_dir)
    info: DataInfo = datasets.info
    device = accelerator.device
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    train_set = SeededSamples(datasets.train, seed)
    train_loader = build_loader(train_set, data_cfg, train=True)
    val_loader = build_loader(datasets.val, data_cfg, train=False)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise KdtoolError(f"data.batch_size: {data_cfg.batch_size} is larger than the {len(datasets.train)} training images")
    set_seed(seed)  # the sampler's base seed is read from torch's seed in prepare()
    model = model.to(memory_format=memory_format)
    if accelerator.num_processes > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, train_cfg.optimizer)
    steps_per_epoch = math.ceil(batches_per_epoch / train_cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_cfg, steps_per_epoch))
    if runtime.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    train_step = TrainStep(model, optimizer, scheduler, loss_fn, accelerator, info, train_cfg, seed, memory_format,
                           teacher if teacher_in_loss else None, train_views, teacher_sees_views)
    unreadable_train, unreadable_val = unreadable_flags(datasets.train), unreadable_flags(datasets.val)

    start_epoch, step, best_top1 = 0, 0, -1.0
    resumed: dict = {}  # the part of an epoch a mid-epoch checkpoint had done
    last_record: dict = {}
    metrics_path = out_dir / METRICS_FILE
    if resume and has_checkpoint(out_dir):
        state, optimizer_state, scheduler_state = load_training_state(out_dir / "last")
        load_weights(accelerator.unwrap_model(model), read_state_dict(out_dir / "last"), str(out_dir / "last"))
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        start_epoch, step, best_top1 = state["epoch"], state["step"], state["best_top1"]
        resumed = state.get("mid_epoch", {})
        last_record = state["metrics"]
        if accelerator.is_main_process:
            _truncate_metrics(metrics_path, start_epoch)
    elif accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)

    teacher_val_logits = None
    if teacher is not None:
        teacher_val_logits, val_targets = predict(teacher, val_loader, info, accelerator, channels_last=runtime.channels_last)
        teacher_val = classification_metrics(teacher_val_logits, val_targets)

    def save(state: dict, is_best: bool = False) -> None:
        if accelerator.is_main_process:
            save_checkpoint(out_dir, model_state=accelerator.unwrap_model(model).state_dict(),
                            optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                            state={"step": step, "best_top1": best_top1, "seed": seed, **state}, is_best=is_best)

    def interrupted(signum: int, where: str) -> Interrupted:
        return Interrupted(f"{label}: stopped by {signal.Signals(signum).name} {where} (step {step}); "
                           f"saved {out_dir / 'last'}; --resume continues from there", signum)

    total_steps = min(train_cfg.epochs * steps_per_epoch, train_cfg.max_steps or math.inf)
    with stop_on_signals() as stop:
        for epoch in range(start_epoch, train_cfg.epochs):
            if step >= total_steps:
                break
            set_seed(epoch_seed(seed, epoch))
            train_loader.set_epoch(epoch)
            train_set.set_epoch(epoch)  # Accelerate forwards set_epoch to the dataset on one process only
            skip = resumed.get("batches", 0)
            loader = skip_first_batches(train_loader, skip) if skip else train_loader
            sums = {name: torch.tensor(value, device=device) for name, value in resumed.get("sums", {}).items()}
            if unreadable_train is not None:
                unreadable_train.zero_()
                unreadable_train[resumed.get("unreadable_images", [])] = True
            model.train()
            started = time.perf_counter()
            bar = tqdm(loader, desc=f"{label} {epoch + 1}/{train_cfg.epochs}", leave=False, dynamic_ncols=True,
                       initial=skip, total=batches_per_epoch,
                       disable=not (progress and accelerator.is_local_main_process))
            stopped_after = 0
            for i, (images, targets) in enumerate(bar, start=skip):
                if resumed:  # the first batch after a mid-epoch checkpoint: dropout draws continue from it
                    _restore_rng(resumed["rng"], device)
                    resumed = {}
                syncing = (i + 1) % train_cfg.grad_accum == 0 or i + 1 == batches_per_epoch
                parts = train_step(images, targets, step, syncing)
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0) + value.detach()
                step += syncing
                stopping = syncing and stop.agreed(accelerator)
                if (i + 1) % LOG_EVERY == 0 or i + 1 == batches_per_epoch or stopping:
                    loss_value = parts["loss"].item()
                    if not math.isfinite(loss_value):
                        kept = f"the last good checkpoint is {out_dir / 'last'}" if (out_dir / "last").exists() else "no checkpoint was written"
                        raise CheckFailed(f"{label}: loss became {loss_value} at epoch {epoch + 1}, step {step}; {kept} (learning rate too high?)")
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
                if stopping:
                    stopped_after = i + 1
                    break
                if step >= total_steps:
                    break
            bar.close()
            if stopped_after and stopped_after < batches_per_epoch:
                mid_epoch = {"batches": stopped_after, "sums": {k: v.item() for k, v in sums.items()},
                             "rng": _rng_snapshot(device)}
                if unreadable_train is not None:
                    mid_epoch["unreadable_images"] = unreadable_train.nonzero().flatten().tolist()
                save({"epoch": epoch, "mid_epoch": mid_epoch, "finished": False, "metrics": last_record})
                raise interrupted(stop.signum, f"at epoch {epoch + 1}, batch {stopped_after}/{batches_per_epoch}")
            train_seconds = time.perf_counter() - started
            finished = epoch + 1 == train_cfg.epochs or step >= total_steps

            record = {"stage": label, "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0]}
            # Each process summed its share of every batch; the record holds the mean over all of them.
            record.update({f"train_{k}": (accelerator.reduce(v, "mean") / (i + 1)).item() for k, v in sums.items()})
            if unreadable_train is not None:
                record["skipped_images"] = int(unreadable_train.sum())
            evaluate_now = (epoch + 1) % train_cfg.eval_every == 0 or finished
            if evaluate_now:
                logits, val_targets = predict(model, val_loader, info, accelerator, channels_last=runtime.channels_last)
                record.update({f"val_{k}": v for k, v in classification_metrics(logits, val_targets, teacher_val_logits).items()})
                if teacher is not None:
                    record.update({f"teacher_val_{k}": v for k, v in teacher_val.items()})
                if unreadable_val is not None:
                    record["skipped_val_images"] = int(unreadable_val.sum())
            record["train_seconds"] = round(train_seconds, 3)
            record["epoch_seconds"] = round(time.perf_counter() - started, 3)
            is_best = evaluate_now and record["val_top1"] > best_top1
            best_top1 = record["val_top1"] if is_best else best_top1
            save({"epoch": epoch + 1, "rng": {"epoch_seed": epoch_seed(seed, epoch), "jda_seed": seed},
                  "finished": finished, "metrics": record}, is_best=is_best)
            if accelerator.is_main_process:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                if evaluate_now:
                    shown = ", ".join(f"{k}={v:.2f}" for k, v in record.items() if k.startswith("val_"))
                    tqdm.write(f"{label} epoch {epoch + 1}/{train_cfg.epochs}: loss={record['train_loss']:.4f} {shown}")
                if record.get("skipped_images") or record.get("skipped_val_images"):
                    tqdm.write(f"{label} epoch {epoch + 1}: skipped {record['skipped_images']} unreadable training image(s)"
                               f" and {record.get('skipped_val_images', 0)} validation image(s) (data.bad_images: skip)")
            accelerator.wait_for_everyone()
            last_record = record
            if stop.agreed(accelerator):
                raise interrupted(stop.signum, f"after epoch {epoch + 1}")
    best_state = read_state(out_dir / "best") if (out_dir / "best").exists() else {}
    return FitResult(best=best_state.get("metrics", {}), last=last_record, out_dir=out_dir)


# ------------------------------------------------------------------ the stage
def prepare_run_dir(run_dir: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> None:
    """Create, check or clear the run directory (already checked by `check_run_target`).

    An existing run is continued only with `resume` and replaced only with `overwrite`.
    """
    saved = run_dir / RECIPE_FILE
    if resume:
        if not saved.exists() or not (has_checkpoint(run_dir) or has_checkpoint(run_dir / "teacher")):
            raise KdtoolError(f"--resume: nothing to resume in {run_dir} (no checkpoint)")
        before = load_recipe(saved)
        if dump_recipe(before) != dump_recipe(recipe):
            changed = _first_difference(before.model_dump(), recipe.model_dump())
            raise KdtoolError(f"--resume: the recipe differs from the one {run_dir} was started with (at {changed})")
        return
    if has_content(run_dir):
        if not overwrite:
            raise KdtoolError(f"run directory {run_dir} exists; pass --resume to continue it or --overwrite to replace it")
        clear_run(run_dir)
    claim(run_dir)
    save_recipe(recipe, saved)


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "(top level)"


def train_teacher(recipe: Recipe, teacher: nn.Module, datasets: Datasets, teacher_dir: Path, accelerator: Accelerator,
                  *, resume: bool, progress: bool) -> None:
    """Train the teacher with cross-entropy into `teacher_dir` (nothing to do when it finished before)."""
    if is_finished(teacher_dir):
        return
    fit(teacher, datasets, train_cfg=recipe.teacher.train, data_cfg=recipe.data, runtime=recipe.runtime,
        accelerator=accelerator, out_dir=teacher_dir, seed=recipe.seed,
        loss_fn=build_loss(MethodConfig(name="vanilla"), recipe.teacher.train.label_smoothing)[0],
        resume=resume, label="teacher", progress=progress)


def distill(recipe: Recipe, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True, accelerator: Optional[Accelerator] = None) -> dict:
    """The distil stage: train the teacher if needed, then the student. Returns the run summary."""
    run_dir = Path(run_dir)
    # Everything that can be wrong with the input is checked before the run directory is touched.
    datasets = build_datasets(recipe.data)
    num_classes = datasets.info.num_classes
    set_seed(recipe.seed)  # model initialisation depends on the seed alone
    student = build_model(recipe.student.name, num_classes, recipe.student.weights)
    teacher = build_model(recipe.teacher.name, num_classes, recipe.teacher.weights)
    loss_fn, needs_teacher = build_loss(recipe.method, recipe.train.label_smoothing)
    jda = recipe.augment.jda
    train_views = build_train_views(jda, recipe.seed)
    accelerator = accelerator or build_accelerator(recipe.runtime)
    if accelerator.is_main_process:
        check_run_target(run_dir)  # before the lock file is created in it
    with run_lock(run_dir) if accelerator.is_main_process else contextlib.nullcontext():
        if accelerator.is_main_process:
            prepare_run_dir(run_dir, recipe, resume=resume, overwrite=overwrite)
        accelerator.wait_for_everyone()

        summary: dict = {"recipe": recipe.name, "run_dir": str(run_dir)}
        if recipe.teacher.weights is None:
            teacher_dir = run_dir / "teacher"
            train_teacher(recipe, teacher, datasets, teacher_dir, accelerator, resume=resume, progress=progress)
            summary["teacher"] = read_state(teacher_dir / "best")["metrics"]
            teacher = load_teacher(run_dir, recipe, num_classes)
        if not is_finished(run_dir):
            fit(student, datasets, train_cfg=recipe.train, data_cfg=recipe.data, runtime=recipe.runtime,
                accelerator=accelerator, out_dir=run_dir, seed=recipe.seed, loss_fn=loss_fn, teacher=teacher,
                teacher_in_loss=needs_teacher, train_views=train_views,
                teacher_sees_views=jda.teacher_sees_views, resume=resume, label="student", progress=progress)
        summary["student"] = read_state(run_dir / "best")["metrics"]
        if accelerator.is_main_process:
            write_json_atomic(run_dir / SUMMARY_FILE, summary)
        return summary
