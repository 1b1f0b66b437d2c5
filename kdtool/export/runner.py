"""One ONNX Runtime session factory and one batched-inference path, shared by export's verification,
the INT8 fallback and sensitivity, and every runtime of `kdtool bench`.

`ort_session` opens a model on the providers asked for and checks it got the first of them.
`emulated=True` turns every graph optimisation off
(ORT_DISABLE_ALL): ONNX Runtime then runs a Q/DQ graph node by node, QuantizeLinear rounding and
saturating to the integer grid and DequantizeLinear mapping back to float before each float Conv/Gemm,
so no integer kernel (QLinearConv, ConvInteger, MatMulInteger) runs; those only appear when the QDQ
fusions of the optimisation levels rewrite the graph. That is the arithmetic TensorRT performs for an
explicitly quantised network (int8 x int8 products accumulated exactly, rescaled in float), without the
u8s8 saturation of AVX2 CPU kernels. tests/test_export.py checks that an emulated session's graph keeps
no integer kernel.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from kdtool.errors import KdtoolError

Predict = Callable[[np.ndarray], np.ndarray]  # a float32 (n, 3, H, W) batch -> float32 (n, C) logits
CPU = ("CPUExecutionProvider",)


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def ort_session(model: Path | bytes, *, providers: Sequence = CPU, threads: int | None = None,
                emulated: bool = False, optimized_model_path: Path | None = None, cpu_fallback: bool = True):
    """An ONNX Runtime session on `providers` (full graph optimisation, or none when `emulated`), whose first
    provider is the first one asked for, or KdtoolError. With `cpu_fallback` False, ONNX Runtime refuses to
    place any node on its CPU provider (the `session.disable_cpu_ep_fallback` session config entry of
    onnxruntime_session_options_config_keys.h), and a failed run is
    never retried on other providers (InferenceSession.disable_fallback)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if emulated
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    source, wanted = (model if isinstance(model, bytes) else str(model)), _provider_name(providers[0])
    name = model if isinstance(model, Path) else "the model"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ORT prints its own fallback attempts to stdout
            session = ort.InferenceSession(source, options, providers=list(providers))
    except Exception as exc:  # ORT raises its own exception types (Fail, NotImplemented, InvalidGraph, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdtoolError(f"ONNX Runtime cannot load {name} on {wanted}"
                          f"{'' if cpu_fallback else ' (CPU fallback disabled)'}: {reason}") from None
    session.disable_fallback()
    if session.get_providers()[0] != wanted:
        raise KdtoolError(f"ONNX Runtime did not give {name} the {wanted} it asked for: the session has "
                          f"{', '.join(session.get_providers())}")
    return session


def session_predict(session, output_name: str | None = None) -> Predict:
    """`session` as a Predict: its first input fed, `output_name` (or its first output) returned as float32."""
    input_name = session.get_inputs()[0].name
    outputs = [output_name] if output_name else None
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def predict(batch: np.ndarray) -> np.ndarray:
        feed = {input_name: np.ascontiguousarray(batch, dtype=dtype)}
        return np.asarray(session.run(outputs, feed)[0], dtype=np.float32)

    return predict


def chunks(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """`images` `batch_size` at a time (the last chunk may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def batched_logits(predict: Predict, batches: Iterable[np.ndarray], batch_size: int | None = None) -> np.ndarray:
    """Logits of `predict` over every batch, each fed at most `batch_size` images at a time, concatenated."""
    parts = [predict(chunk) for batch in batches
             for chunk in (chunks(batch, batch_size) if batch_size else (batch,))]
    if not parts:
        raise KdtoolError("no images to run")
    return np.concatenate(parts)


def labelled_logits(predict: Predict, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of `predict` over re-iterable (images, labels) batches."""
    labels: list[np.ndarray] = []

    def images_of():
        for images, batch_labels in batches:
            labels.append(np.asarray(batch_labels))
            yield images

    logits = batched_logits(predict, images_of(), batch_size)
    return logits, np.concatenate(labels)


def run_batched(session, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of an ONNX Runtime session over `images`, `batch_size` at a time."""
    return batched_logits(session_predict(session), [images], batch_size)
