"""Checkpoints: the full resumable state, written so a kill never leaves a corrupt one.

Layout inside a training output directory::

    checkpoints/epoch-0007/model.safetensors   model weights (what export reads)
                          state.safetensors    optimizer tensors
                          state.json           epoch, step, optimizer groups, scheduler, RNG seed, metrics
    checkpoints/epoch-0007-batch-000120/       a run stopped by a signal: epoch 8 done up to batch 120
                                               (state.json `mid_epoch`: batches, running loss sums, RNG)
    last -> checkpoints/epoch-0007             symlinks, swapped in one atomic rename
    best -> checkpoints/epoch-0005

A checkpoint directory is complete before any link points at it; directories that no link
points at are removed afterwards.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdtool.errors import KdtoolError
from kdtool.io import remove_tree_inside, staging_dir, write_json_atomic
# The run layout's names live in kdtool.rundir; read_state is re-exported for the callers of this module.
from kdtool.rundir import BEST, CHECKPOINT_WEIGHTS, CHECKPOINTS_DIR, LAST, STATE_FILE, STATE_WEIGHTS, read_state

__all__ = ["load_training_state", "read_state", "save_checkpoint"]


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"].setdefault(str(index), {})[key] = value
    return tensors, plain


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def _point(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-link")
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def save_checkpoint(out_dir: Path, *, model_state: dict, optimizer_state: dict, scheduler_state: dict,
                    state: dict, is_best: bool) -> Path:
    """Write a checkpoint for ``state['epoch']`` (and ``state['mid_epoch']``) and point `last` (and `best`) at it."""
    out_dir = Path(out_dir)
    name = f"epoch-{state['epoch']:04d}"
    if "mid_epoch" in state:
        name += f"-batch-{state['mid_epoch']['batches']:06d}"
    target = out_dir / CHECKPOINTS_DIR / name
    opt_tensors, opt_plain = _split_optimizer_state(optimizer_state)
    from safetensors import SafetensorError

    try:
        with staging_dir(target, overwrite=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / CHECKPOINT_WEIGHTS))
            save_file(opt_tensors, str(tmp / STATE_WEIGHTS))
            write_json_atomic(tmp / STATE_FILE, {**state, "optimizer": opt_plain, "scheduler": scheduler_state})
    except (SafetensorError, OSError) as exc:  # disk full, file-size limit: `last` still points at the previous one
        kept = f"; {out_dir / LAST} still holds the previous one" if (out_dir / LAST).exists() else ""
        raise KdtoolError(f"cannot write checkpoint {target}: {str(exc).splitlines()[0]}{kept}") from None
    relative = f"{CHECKPOINTS_DIR}/{name}"
    if is_best:
        _point(out_dir / BEST, relative)
    _point(out_dir / LAST, relative)
    keep = {os.path.realpath(out_dir / link) for link in (LAST, BEST) if (out_dir / link).exists()}
    for child in (out_dir / CHECKPOINTS_DIR).iterdir():  # checkpoints/ itself may be a symlink: stay inside the run
        if child.is_dir() and os.path.realpath(child) not in keep and not child.name.startswith("."):
            remove_tree_inside(out_dir, child)
    return target


def load_training_state(checkpoint: Path) -> tuple[dict, dict, dict]:
    """(state, optimizer state dict, scheduler state dict) of a checkpoint directory."""
    from safetensors import SafetensorError

    state = read_state(checkpoint)
    try:
        tensors = load_file(str(Path(checkpoint) / STATE_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise KdtoolError(f"checkpoint {checkpoint}: optimizer state unreadable: {exc}") from None
    return state, _join_optimizer_state(tensors, state.pop("optimizer")), state.pop("scheduler")
