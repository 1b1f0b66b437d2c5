"""ONNX Runtime runners that cannot lie about where they ran.

A session asks for exactly the provider its runtime names (ONNX Runtime's CPU, CUDA or TensorRT
execution provider), never a chain ending in the CPU provider. On a GPU runtime ONNX Runtime's own switch
against CPU fallback is set (the `session.disable_cpu_ep_fallback` session config entry: creating the
session fails when any node would be placed on the CPU provider), InferenceSession.disable_fallback()
stops a failed run from being retried on other providers, and `get_providers()` is checked after loading:
a session whose first provider is not the one asked for is refused (ONNX Runtime only warns and drops a
provider it does not have). So a runtime that did not get its provider fails its case (kdtool.bench.run
records the reason and exits 1) instead of producing a row under its name.

ONNX Runtime's TensorRT provider is built against one TensorRT major version (onnxruntime-gpu 1.18-1.22+:
TensorRT 10, `libnvinfer.so.10`, per its TensorRT execution provider page); `tensorrt_ep_missing` reads the
major the installed provider library links and says in one line when that TensorRT is not installed.
"""
from __future__ import annotations

import ctypes
import re
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from kdtool.bench.loading import Artefact
from kdtool.bench.runner import Runner, RunnerOptions, check_io_shapes
from kdtool.bundle import BundleMismatch
from kdtool.export.runner import ort_session

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# ONNX Runtime's TensorRT provider: precision comes from the graph (the FP16 ONNX, the symmetric Q/DQ ONNX).
# With trt_fp16_enable and trt_int8_enable off, ORT builds a strongly typed TensorRT network (ORT with
# TensorRT 10: microsoft/onnxruntime PR 24298; TensorRT 11 has only strongly typed networks).
TENSORRT_EP_OPTIONS = {"device_id": 0, "trt_fp16_enable": False, "trt_int8_enable": False}
CUDA_EP_OPTIONS = {"device_id": 0}
TENSORRT_EP_LIBRARY = "libonnxruntime_providers_tensorrt.so"
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-libs", "tensorrt-cu13-libs")
WORKING_SET_HINT = "pip install 'kdtool[ort-gpu]' (onnxruntime-gpu with tensorrt>=10.12,<11)"


class OrtRunner:
    """An ONNX Runtime session on one provider; on a GPU with copies excluded, inputs and outputs stay on the device."""

    max_batch = None

    def __init__(self, artefact: Artefact, provider: tuple[str, dict], options: RunnerOptions, on_gpu: bool,
                 emulated: bool = False):
        self.session = ort_session(artefact.path, providers=[provider], threads=options.threads, emulated=emulated,
                                   cpu_fallback=not on_gpu)
        self.ran_on = self.session.get_providers()[0]
        inputs = {node.name: node for node in self.session.get_inputs()}
        outputs = {node.name: node for node in self.session.get_outputs()}
        if options.input_name not in inputs or options.output_name not in outputs:
            raise BundleMismatch(f"{artefact.path}: no input {options.input_name!r} and output {options.output_name!r} "
                                 f"(the model has inputs {', '.join(inputs)}, outputs {', '.join(outputs)})")
        check_io_shapes(artefact.path, inputs[options.input_name].shape, outputs[options.output_name].shape, options)
        self.dtype = _ORT_DTYPES.get(inputs[options.input_name].type, np.float32)
        self.input_name, self.output_names = options.input_name, [options.output_name]
        self.device_resident = on_gpu and not options.include_copies
        self.run = self._run_bound if self.device_resident else self._run_host

    def stage(self, batch: np.ndarray) -> object:
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if not self.device_resident:
            return batch
        import onnxruntime as ort

        device_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, device_input)
        binding.bind_output(self.output_names[0], "cuda", 0)
        return binding, device_input  # the OrtValue is kept alive with its binding

    def _run_host(self, staged: np.ndarray) -> object:
        return self.session.run(self.output_names, {self.input_name: staged})

    def _run_bound(self, staged) -> object:
        binding, _ = staged
        # Run synchronises the provider's stream before returning (ORT's default run options).
        return self.session.run_with_iobinding(binding)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self.dtype)}
        return self.session.run(self.output_names, feed)[0].astype(np.float32)


def open_ort(provider: str, provider_options: dict | None = None, *, on_gpu: bool,
             emulated: bool = False) -> Callable[[Artefact, RunnerOptions], Runner]:
    """A runtime's `open`: the artefact on exactly `provider` (CPU fallback refused when `on_gpu`);
    `emulated` runs a Q/DQ graph node by node in float (kdtool.export.runner)."""
    def open_runner(artefact: Artefact, options: RunnerOptions) -> Runner:
        if provider == "TensorrtExecutionProvider":
            _load_tensorrt_wheel()
        return OrtRunner(artefact, (provider, dict(provider_options or {})), options, on_gpu=on_gpu, emulated=emulated)
    return open_runner


def _load_tensorrt_wheel() -> None:
    """Import the TensorRT wheel when it is installed: it loads its libnvinfer.so.N from site-packages, where
    the TensorRT provider's dlopen of that soname then finds it (the wheel's libraries are not on the
    loader's path)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass  # a system TensorRT on the loader's path, or none: the session then fails with ORT's reason


def provider_missing(provider: str) -> Callable[[], str | None]:
    """A runtime's `unavailable_reason`: why `provider` is not in this ONNX Runtime build, or None."""
    def reason() -> str | None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if provider not in available:
            return f"{provider} not in onnxruntime.get_available_providers() ({', '.join(available)})"
        return None
    return reason


# ---------------------------------------------------------------- the TensorRT major ONNX Runtime needs
def linked_tensorrt_major(library: Path) -> int | None:
    """The TensorRT major version a provider library links (its `libnvinfer.so.N` entry), None when unknown."""
    try:
        match = re.search(rb"libnvinfer\.so\.(\d{1,3})\x00", Path(library).read_bytes())  # a few MiB
    except OSError:
        return None
    return int(match.group(1)) if match else None


def installed_tensorrt() -> str | None:
    """The version of the TensorRT Python wheel installed here (any of its distribution names), or None."""
    for name in TENSORRT_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def tensorrt_mismatch(needed: int | None, installed: str | None, loadable: Callable[[str], bool]) -> str | None:
    """One line when the TensorRT that ONNX Runtime's provider links (`needed` major) is not here, else None."""
    if needed is None:
        return None
    if installed is not None and installed.split(".")[0] == str(needed):
        return None
    if installed is None and loadable(f"libnvinfer.so.{needed}"):
        return None  # a system TensorRT of the right major
    have = f"the installed tensorrt is {installed}" if installed else f"no libnvinfer.so.{needed} is installed"
    return f"onnxruntime's TensorRT provider needs TensorRT {needed} (libnvinfer.so.{needed}), {have}: {WORKING_SET_HINT}"


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def tensorrt_ep_missing() -> str | None:
    """Why ONNX Runtime's TensorRT provider cannot work here (not built in, or its TensorRT major not installed)."""
    missing = provider_missing("TensorrtExecutionProvider")()
    if missing:
        return missing
    import onnxruntime as ort

    library = Path(ort.__file__).parent / "capi" / TENSORRT_EP_LIBRARY
    return tensorrt_mismatch(linked_tensorrt_major(library), installed_tensorrt(), _loadable)
