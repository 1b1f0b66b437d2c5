"""PyTorch -> ONNX (dynamic batch), and numerical comparison of ONNX models against references.

The exporter is torch's TorchScript-based one (``dynamo=False``). In torch 2.14 the dynamo exporter
builds opset 18 graphs and its down-conversion to opset 17 fails on ReduceMean (axes as input), it
takes ~7x longer on the small nets, and it lowers adaptive pooling to ReduceMean where the
TorchScript exporter emits GlobalAveragePool, which ONNX Runtime's quantiser and TensorRT handle
directly. For the conv/linear classifiers kdtool registers, the TorchScript exporter covers every op.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
from torch import nn

from kdtool.errors import CheckFailed
from kdtool.export.runner import batched_logits, ort_session, run_batched  # noqa: F401  (re-exported: the one session factory)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
EXPORTER = "torch.onnx.export (TorchScript exporter, dynamo=False)"


def export_onnx(model: nn.Module, path: Path, *, image_size: int, opset: int) -> onnx.ModelProto:
    """Export `model` (eval mode, CPU) to `path` with a dynamic batch; the result passes the full checker."""
    example = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(), (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"exported ONNX model {path} fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return proto


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max |diff|, the lowest per-image cosine similarity, and top-1 agreement (fraction)."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-30)
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "min_cosine": float(cosine.min()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
    }


def torch_logits(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Float PyTorch logits, the reference every artefact is compared with."""
    with torch.no_grad():
        return batched_logits(lambda batch: model(torch.from_numpy(batch)).float().numpy(), [images], batch_size)


def verify_logits(label: str, session, images: np.ndarray, reference: np.ndarray, *, batch_sizes: Iterable[int],
                  max_abs_diff: float, min_cosine: float, min_top1_agreement: float) -> dict:
    """Compare `session` with `reference` logits at each batch size; CheckFailed with the figures on a miss."""
    tolerances = {"max_abs_diff": max_abs_diff, "min_cosine": min_cosine, "min_top1_agreement": min_top1_agreement}
    figures = {}
    for batch_size in batch_sizes:
        measured = compare_logits(reference, run_batched(session, images, batch_size))
        figures[str(batch_size)] = measured
        checks = [
            (measured["max_abs_diff"] > max_abs_diff, f"max_abs_diff {measured['max_abs_diff']:.3g} > {max_abs_diff:g}"),
            (measured["min_cosine"] < min_cosine, f"min cosine {measured['min_cosine']:.6f} < {min_cosine:g}"),
            (measured["top1_agreement"] < min_top1_agreement,
             f"top-1 agreement {measured['top1_agreement']:.4f} < {min_top1_agreement:g}"),
        ]
        misses = [text for failed, text in checks if failed]
        if misses:
            raise CheckFailed(f"{label} does not match PyTorch at batch {batch_size} on {len(images)} validation "
                              f"images: {'; '.join(misses)}")
    return {"images": int(len(images)), "reference": "pytorch float32", "tolerances": tolerances, "batch_sizes": figures}
