"""The training state that changes step by step, and saving / resuming it through checkpoints.

A checkpoint is written at every epoch's end and when a signal stops an epoch; each save first
checks that the weights (and the epoch's loss) are finite, so a diverged model is never saved,
let alone as `best`. Resuming restores weights, optimizer, scheduler, the position inside an
epoch and torch's RNG, so a resumed run ends bit-exactly like an uninterrupted one.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdtool.checkpoint import load_training_state, save_checkpoint
from kdtool.errors import CheckFailed, KdtoolError
from kdtool.io import write_text_atomic
from kdtool.models import load_weights, read_state_dict
from kdtool.rundir import BEST, LAST, METRICS_FILE, checkpoint_link
from kdtool.train.step import TrainStep


@dataclass
class TrainState:
    """What changes while training, and what a checkpoint holds to continue exactly from it."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_top1: float = -1.0  # best validation top-1 so far (-1 before the first evaluation)
    last_record: dict = field(default_factory=dict)  # metrics of the last completed epoch
    mid_epoch: dict = field(default_factory=dict)  # where a signalled epoch stopped: batches, loss sums, RNG


def rng_snapshot(device: torch.device) -> dict[str, str]:
    """torch's global RNG states (dropout draws from them), as JSON-friendly base64."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {name: base64.b64encode(state.numpy().tobytes()).decode() for name, state in states.items()}


def restore_rng(snapshot: dict[str, str], device: torch.device) -> None:
    """Undo `rng_snapshot`."""
    decode = lambda name: torch.frombuffer(bytearray(base64.b64decode(snapshot[name])), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode("cpu"))
    if device.type == "cuda" and "cuda" in snapshot:
        torch.cuda.set_rng_state(decode("cuda"), device)


def diverged(label: str, what: str, epoch: int, step: int, out_dir: Path) -> CheckFailed:
    """The error for a non-finite loss or weights (exit 1), naming the last good checkpoint."""
    last = Path(out_dir) / LAST
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
    return CheckFailed(f"{label}: {what} at epoch {epoch}, step {step}; {kept} (learning rate too high?)")


def check_finite(model_state: dict, record: dict, label: str, epoch: int, step: int, out_dir: Path) -> None:
    """CheckFailed unless the epoch's loss and every weight are finite (every process gets the same answer)."""
    loss = record.get("train_loss", 0.0)
    if not math.isfinite(loss):
        raise diverged(label, f"loss became {loss}", epoch, step, out_dir)
    bad = next((name for name, t in model_state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise diverged(label, f"weights became non-finite ({bad})", epoch, step, out_dir)


def save_state(out_dir: Path, trainer: TrainStep, state: TrainState, fields: dict, *, label: str, is_best: bool = False) -> None:
    """Check finiteness, then checkpoint `state` plus `fields` (epoch, finished, metrics, ...) on the main process."""
    accelerator = trainer.accelerator
    model_state = accelerator.unwrap_model(trainer.model).state_dict()
    epoch = fields["epoch"] + 1 if "mid_epoch" in fields else fields["epoch"]  # the 1-based epoch being saved
    check_finite(model_state, fields.get("metrics", {}), label, epoch, state.step, out_dir)
    if accelerator.is_main_process:
        save_checkpoint(out_dir, model_state=model_state, optimizer_state=trainer.optimizer.state_dict(),
                        scheduler_state=trainer.scheduler.state_dict(),
                        state={"step": state.step, "best_top1": state.best_top1, "seed": trainer.seed, **fields},
                        is_best=is_best)


def start_fresh(out_dir: Path, main_process: bool) -> TrainState:
    """A new state for `out_dir`, refusing one that holds another run's checkpoints (never replaced unasked)."""
    for which in (LAST, BEST):
        link = checkpoint_link(out_dir, which)
        if link.exists():
            raise KdtoolError(f"{link} exists but there is nothing to resume from; "
                              f"resume the run, or start again with --overwrite")
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
    return TrainState()


def resume_state(out_dir: Path, trainer: TrainStep) -> TrainState:
    """Load `out_dir/last` into the model, optimizer and scheduler; the state to continue from."""
    checkpoint_link(out_dir, BEST)  # a dangling `best` is refused like a dangling `last`
    last = out_dir / LAST
    state, optimizer_state, scheduler_state = load_training_state(last)
    load_weights(trainer.accelerator.unwrap_model(trainer.model), read_state_dict(last), str(last))
    try:
        trainer.optimizer.load_state_dict(optimizer_state)
        trainer.scheduler.load_state_dict(scheduler_state)
        resumed = TrainState(epoch=int(state["epoch"]), step=int(state["step"]), best_top1=float(state["best_top1"]),
                             last_record=dict(state["metrics"]), mid_epoch=dict(state.get("mid_epoch", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise KdtoolError(f"checkpoint {last}: state does not fit this training ({type(exc).__name__}: {exc})") from None
    if trainer.accelerator.is_main_process:
        truncate_metrics(out_dir / METRICS_FILE, resumed.epoch)
    return resumed


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop records written after the checkpoint we resume from (a killed run may have left some)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
