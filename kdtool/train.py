"""The training loop on HF Accelerate: teacher training (CE) and distillation share it.

`distill(recipe, run_dir)` is the whole stage: train the teacher when the recipe names no teacher
weights, then distil the student. `fit(...)` is the loop itself, usable on its own with any model.
Device placement, DDP and mixed precision go through the `Accelerator` only, so the same code
runs on one CPU, one GPU or `accelerate launch` across GPUs and nodes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from kdtool.augment import JDAParams, JointAugment, build_jda, joint_batch
from kdtool.checkpoint import load_training_state, read_state, save_checkpoint
from kdtool.data import DataInfo, Datasets, build_datasets, build_loader, normalize
from kdtool.errors import CheckFailed, KdtoolError
from kdtool.evaluate import classification_metrics, predict
from kdtool.io import write_json_atomic, write_text_atomic
from kdtool.losses import LossFn, build_loss
from kdtool.models import build_model, load_weights, read_state_dict
from kdtool.recipe import DataConfig, MethodConfig, OptimizerConfig, Recipe, RuntimeConfig, TrainConfig, dump_recipe, load_recipe, save_recipe

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
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


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for one step's augmentation draws, a pure function of (seed, step)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63))
    return generator


def local_jda_params(augment: JointAugment, views: int, local_batch: int, accelerator: Accelerator,
                     generator: torch.Generator) -> JDAParams:
    """Draw for the whole global batch and keep this process's rows, so results do not depend on the process count."""
    world, rank = accelerator.num_processes, accelerator.process_index
    drawn = augment.sample(views * local_batch * world, generator, accelerator.device)
    take = lambda t: t.view(views, world, local_batch, -1)[:, rank].reshape(views * local_batch, -1)  # noqa: E731
    return JDAParams(fire=take(drawn.fire), sign=take(drawn.sign))


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Refuse a second kdtool process on the same run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KdtoolError(f"run directory {run_dir} is in use by another kdtool process") from None
        yield


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop records written after the checkpoint we resume from (a killed run may have left some)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------ the loop
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
    augment: Optional[JointAugment] = None,
    views: int = 0,
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
    views = views if augment is not None else 0
    device = accelerator.device
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    train_loader = build_loader(datasets.train, data_cfg, train=True)
    val_loader = build_loader(datasets.val, data_cfg, train=False)
    if len(train_loader) == 0:
        raise KdtoolError(f"data.batch_size: {data_cfg.batch_size} is larger than the {len(datasets.train)} training images")
    set_seed(seed)  # the sampler's base seed is read from torch's seed in prepare()
    model = model.to(memory_format=memory_format)
    if accelerator.num_processes > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, train_cfg.optimizer)
    steps_per_epoch = math.ceil(len(train_loader) / train_cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_cfg, steps_per_epoch))
    if runtime.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)

    start_epoch, step, best_top1 = 0, 0, -1.0
    metrics_path = out_dir / METRICS_FILE
    if resume and (out_dir / "last").exists():
        state, optimizer_state, scheduler_state = load_training_state(out_dir / "last")
        load_weights(accelerator.unwrap_model(model), read_state_dict(out_dir / "last"), str(out_dir / "last"))
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        start_epoch, step, best_top1 = state["epoch"], state["step"], state["best_top1"]
        if accelerator.is_main_process:
            _truncate_metrics(metrics_path, start_epoch)
    elif accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)

    teacher_val_logits = None
    if teacher is not None:
        teacher_val_logits, val_targets = predict(teacher, val_loader, info, accelerator, channels_last=runtime.channels_last)
        teacher_val = classification_metrics(teacher_val_logits, val_targets)

    last_record: dict = {}
    total_steps = min(train_cfg.epochs * steps_per_epoch, train_cfg.max_steps or math.inf)
    for epoch in range(start_epoch, train_cfg.epochs):
        if step >= total_steps:
            break
        set_seed(seed * 1000 + epoch)  # the state at an epoch boundary is a function of (seed, epoch)
        train_loader.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(train_loader, desc=f"{label} {epoch + 1}/{train_cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (progress and accelerator.is_local_main_process))
        for i, (images, targets) in enumerate(bar):
            images = images.to(device, non_blocking=True).float().div_(255)
            if views:
                params = local_jda_params(augment, views, images.shape[0], accelerator, step_generator(seed, step, device))
                images = joint_batch(images, augment, views, params)
            inputs = normalize(images, info).contiguous(memory_format=memory_format)
            if teacher is not None and teacher_in_loss:
                with torch.no_grad(), accelerator.autocast():
                    if views and not teacher_sees_views:
                        teacher_logits = teacher(inputs[: targets.shape[0]]).repeat(1 + views, 1)
                    else:
                        teacher_logits = teacher(inputs)
            else:
                teacher_logits = None
            syncing = (i + 1) % train_cfg.grad_accum == 0 or i + 1 == len(train_loader)
            with contextlib.nullcontext() if syncing else accelerator.no_sync(model):
                parts = loss_fn(model(inputs), teacher_logits, targets, views)
                accelerator.backward(parts["loss"] / train_cfg.grad_accum)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0) + value.detach()
            if syncing:
                if train_cfg.clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), train_cfg.clip_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            if (i + 1) % LOG_EVERY == 0 or i + 1 == len(train_loader):
                loss_value = parts["loss"].item()
                if not math.isfinite(loss_value):
                    kept = f"the last good checkpoint is {out_dir / 'last'}" if (out_dir / "last").exists() else "no checkpoint was written"
                    raise CheckFailed(f"{label}: loss became {loss_value} at epoch {epoch + 1}, step {step}; {kept} (learning rate too high?)")
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
            if step >= total_steps:
                break
        bar.close()
        train_seconds = time.perf_counter() - started
        finished = epoch + 1 == train_cfg.epochs or step >= total_steps

        record = {"stage": label, "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0]}
        record.update({f"train_{k}": (v / (i + 1)).item() for k, v in sums.items()})
        evaluate_now = (epoch + 1) % train_cfg.eval_every == 0 or finished
        if evaluate_now:
            logits, val_targets = predict(model, val_loader, info, accelerator, channels_last=runtime.channels_last)
            record.update({f"val_{k}": v for k, v in classification_metrics(logits, val_targets, teacher_val_logits).items()})
            if teacher is not None:
                record.update({f"teacher_val_{k}": v for k, v in teacher_val.items()})
        record["train_seconds"] = round(train_seconds, 3)
        record["epoch_seconds"] = round(time.perf_counter() - started, 3)
        is_best = evaluate_now and record["val_top1"] > best_top1
        best_top1 = record["val_top1"] if is_best else best_top1
        if accelerator.is_main_process:
            save_checkpoint(
                out_dir,
                model_state=accelerator.unwrap_model(model).state_dict(),
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                state={"epoch": epoch + 1, "step": step, "best_top1": best_top1, "seed": seed,
                       "rng": {"epoch_seed": seed * 1000 + epoch, "jda_seed": seed},
                       "finished": finished, "metrics": record},
                is_best=is_best,
            )
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if evaluate_now:
                shown = ", ".join(f"{k}={v:.2f}" for k, v in record.items() if k.startswith("val_"))
                tqdm.write(f"{label} epoch {epoch + 1}/{train_cfg.epochs}: loss={record['train_loss']:.4f} {shown}")
        accelerator.wait_for_everyone()
        last_record = record
    best_state = read_state(out_dir / "best") if (out_dir / "best").exists() else {}
    return FitResult(best=best_state.get("metrics", {}), last=last_record or read_state(out_dir / "last")["metrics"], out_dir=out_dir)


# ------------------------------------------------------------------ the stage
def prepare_run_dir(run_dir: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> None:
    """Create, check or clear the run directory; never touches an existing run unless told to."""
    saved = run_dir / RECIPE_FILE
    if resume:
        if not saved.exists() or not ((run_dir / "last").exists() or (run_dir / "teacher" / "last").exists()):
            raise KdtoolError(f"--resume: nothing to resume in {run_dir} (no checkpoint)")
        before = load_recipe(saved)
        if dump_recipe(before) != dump_recipe(recipe):
            changed = _first_difference(before.model_dump(), recipe.model_dump())
            raise KdtoolError(f"--resume: the recipe differs from the one {run_dir} was started with (at {changed})")
        return
    if run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()):
        if not overwrite:
            raise KdtoolError(f"run directory {run_dir} exists; pass --resume to continue it or --overwrite to replace it")
        for child in run_dir.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, saved)


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "(top level)"


def teacher_source(run_dir: Path, recipe: Recipe) -> Optional[str]:
    """Where the teacher's weights are: the recipe's, or the teacher trained in this run."""
    return recipe.teacher.weights or str(Path(run_dir) / "teacher" / "best")


def load_teacher(run_dir: Path, recipe: Recipe, num_classes: int) -> nn.Module:
    """The run's teacher, frozen, on the CPU."""
    return build_model(recipe.teacher.name, num_classes, teacher_source(run_dir, recipe)).eval().requires_grad_(False)


def load_student(run_dir: Path, recipe: Recipe, num_classes: int, which: str = "best") -> nn.Module:
    """The run's student from its `best` (or `last`) checkpoint, in eval mode, on the CPU."""
    checkpoint = Path(run_dir) / which
    if not checkpoint.exists():
        raise KdtoolError(f"run {run_dir} has no {which} student checkpoint (did distillation finish an epoch?)")
    return build_model(recipe.student.name, num_classes, str(checkpoint)).eval()


def is_finished(out_dir: Path) -> bool:
    """Whether the training in `out_dir` ran to its last epoch."""
    return (out_dir / "last").exists() and read_state(out_dir / "last").get("finished", False)


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
    augment = build_jda(jda)
    accelerator = accelerator or build_accelerator(recipe.runtime)
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
                teacher_in_loss=needs_teacher, augment=augment, views=jda.views,
                teacher_sees_views=jda.teacher_sees_views, resume=resume, label="student", progress=progress)
        summary["student"] = read_state(run_dir / "best")["metrics"]
        if accelerator.is_main_process:
            write_json_atomic(run_dir / SUMMARY_FILE, summary)
        return summary
