"""Runtimes that run a bundle's artefacts: a small registry; each entry says whether it is available here
and, when not, why, and which artefacts it serves.

A runtime serves the artefacts whose format and target (the artefact table, kdtool.bundle.artefacts) it
declares: ONNX Runtime's CPU provider runs every ONNX artefact made for any device, a CPU or a GPU, but
never the TensorRT INT8 ONNX, whose accuracy is judged on `ort-emulated` (its Q/DQ graph in float:
what TensorRT computes) and which is timed only on TensorRT. Adding a runtime is one runner module and
one entry below; the artefact table does not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kdtool.bench.loading import Artefact
from kdtool.bench.openvino_runner import OpenVinoRunner, openvino_missing
from kdtool.bench.ort_runner import (
    CUDA_EP_OPTIONS, TENSORRT_EP_OPTIONS, OrtRunner, open_ort, provider_missing, tensorrt_ep_missing,
)
from kdtool.bench.runner import Runner, RunnerOptions, check_io_shapes
from kdtool.bench.tensorrt_runner import TensorRTRunner, tensorrt_missing
from kdtool.bench.torch_runner import TorchRunner, open_torch
from kdtool.bundle import ACCURACY, ARTEFACTS, TARGETS
from kdtool.errors import Registry

__all__ = ["RUNTIMES", "OrtRunner", "Runner", "RunnerOptions", "Runtime", "TensorRTRunner", "TorchRunner",
           "artefact_table", "check_io_shapes", "serving_runtimes"]


@dataclass(frozen=True)
class Runtime:
    name: str
    formats: frozenset[str]  # artefact formats it runs ("onnx", "tensorrt"; "pytorch" for the float student)
    targets: frozenset[str]  # artefact targets it serves (kdtool.bundle.artefacts.TARGETS)
    uses_gpu: bool
    unavailable_reason: Callable[[], str | None]
    open: Callable[[Artefact, RunnerOptions], Runner]
    packages: tuple[str, ...] = ()  # distributions whose versions the report records
    timed: bool = True  # False: accuracy only (emulation is not a deployment)

    def runs(self, artefact: Artefact) -> bool:
        return artefact.kind in self.formats and artefact.target in self.targets


def _all_of(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
    def reason() -> str | None:
        return next((why for why in (check() for check in checks) if why), None)
    return reason


def _cuda_missing() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU visible to PyTorch"


ONNX, ENGINE, PYTORCH = frozenset({"onnx"}), frozenset({"tensorrt"}), frozenset({"pytorch"})
HOST_TARGETS = frozenset({"any", "cpu", "gpu"})  # a CPU runs every ONNX artefact except TensorRT's INT8

RUNTIMES: Registry[Runtime] = Registry("runtime", {
    "pytorch-cpu": Runtime("pytorch-cpu", PYTORCH, PYTORCH, False, lambda: None, open_torch("cpu"), ("torch",)),
    "pytorch-cuda": Runtime("pytorch-cuda", PYTORCH, PYTORCH, True, _cuda_missing, open_torch("cuda"), ("torch",)),
    "ort-cpu": Runtime("ort-cpu", ONNX, HOST_TARGETS, False, provider_missing("CPUExecutionProvider"),
                       open_ort("CPUExecutionProvider", on_gpu=False), ("onnxruntime",)),
    "openvino-cpu": Runtime("openvino-cpu", ONNX, HOST_TARGETS, False, openvino_missing, OpenVinoRunner, ("openvino",)),
    "ort-emulated": Runtime("ort-emulated", ONNX, frozenset({"tensorrt"}), False,
                            provider_missing("CPUExecutionProvider"),
                            open_ort("CPUExecutionProvider", on_gpu=False, emulated=True), ("onnxruntime",),
                            timed=False),
    "ort-cuda": Runtime("ort-cuda", ONNX, frozenset({"any", "gpu"}), True,
                        _all_of(_cuda_missing, provider_missing("CUDAExecutionProvider")),
                        open_ort("CUDAExecutionProvider", CUDA_EP_OPTIONS, on_gpu=True), ("onnxruntime-gpu",)),
    "ort-tensorrt": Runtime("ort-tensorrt", ONNX, frozenset({"any", "gpu", "tensorrt"}), True,
                            _all_of(_cuda_missing, tensorrt_ep_missing),
                            open_ort("TensorrtExecutionProvider", TENSORRT_EP_OPTIONS, on_gpu=True),
                            ("onnxruntime-gpu", "tensorrt")),
    "tensorrt": Runtime("tensorrt", ENGINE, frozenset({"tensorrt"}), True, tensorrt_missing, TensorRTRunner,
                        ("tensorrt",)),
})


def serving_runtimes(key: str, runtimes=RUNTIMES) -> list[str]:
    """The names of the runtimes that serve the artefact `key` of the artefact table."""
    kind = ARTEFACTS[key]
    return [name for name, runtime in runtimes.items() if kind.format in runtime.formats and kind.target in runtime.targets]


def artefact_table(runtimes=RUNTIMES) -> str:
    """The artefact table as markdown (export/README.md shows it): file, precision, target, what it is,
    the runtimes that serve it and how its accuracy is judged."""
    rows = ["| artefact | file | precision | target | made for | runtimes that serve it (`kdtool bench`) | accuracy judged |",
            "|---|---|---|---|---|---|---|"]
    for key, kind in ARTEFACTS.items():
        rows.append(f"| `{key}` | `{kind.file}` | {kind.precision} | `{kind.target}`: {TARGETS[kind.target]} | "
                    f"{kind.made_for} | {', '.join(serving_runtimes(key, runtimes))} | {ACCURACY[kind.accuracy]} |")
    return "\n".join(rows) + "\n"
