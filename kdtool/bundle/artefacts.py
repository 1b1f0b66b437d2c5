"""The artefact table: every kind of file a bundle can hold, described once.

Each row says how the file is named, its precision, its format (the manifest's `kind`), the target it is
made for, what it is in words, and how its accuracy is judged. The manifest schema (keys, precisions,
kinds, targets), export (file names, engine sources), bench (which runtime serves which artefact: a
runtime declares the formats and targets it runs, kdtool.bench.runtimes) and the README tables
(kdtool.bench.runtimes.artefact_table) all read this table; nothing else describes an artefact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# target -> what it means; a runtime serves some targets (kdtool.bench.runtimes)
TARGETS = {
    "any": "any runtime that runs ONNX",
    "cpu": "CPUs (U8S8 integer kernels)",
    "gpu": "GPUs (float16 compute)",
    "tensorrt": "TensorRT (symmetric INT8 Q/DQ, strongly typed engines)",
}

# how an artefact's accuracy is judged
ACCURACY = {
    "served": "on every runtime that serves it, as that runtime computes it",
    "emulated": "its Q/DQ graph run in float on the CPU (ort-emulated), the arithmetic of its target; "
                "timed only on runtimes of its target",
}


@dataclass(frozen=True)
class ArtefactKind:
    """One row of the artefact table."""

    key: str  # the manifest's artefacts.<key>
    file: str  # its file name inside the bundle
    precision: str  # "fp32", "fp16" or "int8"
    format: str  # "onnx" or "tensorrt" (an engine); the manifest's `kind`
    target: str  # a key of TARGETS
    made_for: str  # what it is, in words
    accuracy: str = "served"  # a key of ACCURACY
    source: Optional[str] = None  # engines: the key of the ONNX artefact they are built from


ARTEFACTS: dict[str, ArtefactKind] = {kind.key: kind for kind in (
    ArtefactKind("fp32", "model.fp32.onnx", "fp32", "onnx", "any",
                 "float32, dynamic batch, checked against PyTorch"),
    ArtefactKind("fp16", "model.fp16.onnx", "fp16", "onnx", "gpu",
                 "float16 compute with float32 inputs/outputs; source of the TensorRT FP16 engine"),
    ArtefactKind("int8", "model.int8.onnx", "int8", "onnx", "cpu",
                 "U8S8 Q/DQ, per-channel, `reduce_range` from the CPU's flags"),
    ArtefactKind("int8_trt", "model.int8_trt.onnx", "int8", "onnx", "tensorrt",
                 "symmetric INT8 activations and weights, zero points 0, per-channel weights, narrow range "
                 "[-127, 127], float biases, Q/DQ only on the inputs of Conv/ConvTranspose/Gemm/MatMul",
                 accuracy="emulated"),
    ArtefactKind("trt_fp16", "model.trt_fp16.engine", "fp16", "tensorrt", "tensorrt",
                 "strongly typed TensorRT engine built from `model.fp16.onnx`", source="fp16"),
    ArtefactKind("trt_int8", "model.trt_int8.engine", "int8", "tensorrt", "tensorrt",
                 "strongly typed TensorRT engine built from `model.int8_trt.onnx`", source="int8_trt"),
)}

ENGINE_SOURCES = {key: kind.source for key, kind in ARTEFACTS.items() if kind.source}  # engine -> its ONNX source
PRECISIONS = tuple(sorted({kind.precision for kind in ARTEFACTS.values()}))
FORMATS = tuple(sorted({kind.format for kind in ARTEFACTS.values()}))
FILE_SUFFIXES = {"onnx": ".onnx", "tensorrt": ".engine"}
