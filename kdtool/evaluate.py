"""Accuracy metrics shared by training, export verification and bench.

`classification_metrics` works on logits from any runtime (PyTorch, ONNX Runtime, TensorRT);
`predict` runs a PyTorch model over a loader, on one device or gathered across processes.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdtool.data import DataInfo, normalize


def _as_tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array)) if not isinstance(array, torch.Tensor) else array


def topk_accuracy(logits, targets, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k (k capped at the number of classes).

    Ties go to the lower class index, as with argmax: quantised models produce exact ties, and
    every stage must count them the same way.
    """
    logits, targets = _as_tensor(logits).float(), _as_tensor(targets).long()
    best = logits.sort(dim=1, descending=True, stable=True).indices[:, : max(ks)]
    hits = best == targets.unsqueeze(1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def classification_metrics(logits, targets, reference_logits=None, prefix_reference: str = "teacher") -> dict[str, float]:
    """top1/top5; with reference logits also top-1 agreement (%) and mean KL(reference || logits)."""
    metrics = topk_accuracy(logits, targets)
    if reference_logits is not None:
        logits, reference = _as_tensor(logits).float(), _as_tensor(reference_logits).float()
        metrics[f"{prefix_reference}_agreement"] = 100.0 * (logits.argmax(1) == reference.argmax(1)).float().mean().item()
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference, 1), log_target=True, reduction="batchmean")
        metrics[f"{prefix_reference}_kl"] = kl.item()
    return metrics


@torch.no_grad()
def predict(model: nn.Module, loader, info: DataInfo, accelerator=None, device=None, channels_last: bool = False):
    """Logits and targets of `model` over `loader` (gathered across processes with an accelerator)."""
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else (device or torch.device("cpu"))
    all_logits, all_targets = [], []
    for images, targets in loader:
        images = normalize(images.to(device, non_blocking=True), info)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        targets = targets.to(device, non_blocking=True)
        if accelerator is not None:
            logits, targets = accelerator.gather_for_metrics((logits, targets))
        all_logits.append(logits.cpu())
        all_targets.append(targets.cpu())
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_targets)
