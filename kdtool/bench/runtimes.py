"""Runtimes that run a bundle's artefacts: a small registry; each entry says whether it is available
here and, when not, why.

A runtime opens an artefact as a `Runner`: `stage` prepares one input batch before timing (on the
device when host-device copies are excluded), `run` is one timed, synchronous inference on a staged
batch, `predict` returns float32 logits for accuracy. onnx artefacts run on ONNX Runtime providers,
tensorrt engines on native TensorRT, the float student on PyTorch. Each runtime runs the artefacts
whose target (the manifest's `target`) it serves: the TensorRT INT8 ONNX runs on ONNX Runtime's
TensorRT provider, and on `ort-emulated` (its Q/DQ graph in float, accuracy only: what TensorRT
computes), never on the CPU integer kernels it was not made for.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from kdtool.bench.bundle import Artefact
from kdtool.bundle import BundleMismatch
from kdtool.errors import KdtoolError, Registry
from kdtool.export.runner import ort_session


@dataclass(frozen=True)
class RunnerOptions:
    input_name: str
    output_name: str
    threads: int
    include_copies: bool
    cuda_graphs: bool
    input_shape: tuple[int, int, int] | None = None  # (3, H, W) the manifest says; checked when a runner opens
    num_classes: int | None = None


class Runner(Protocol):
    max_batch: int | None

    def stage(self, batch: np.ndarray) -> object: ...

    def run(self, staged: object) -> object: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Runtime:
    name: str
    artefact_kind: str
    uses_gpu: bool
    unavailable_reason: Callable[[], str | None]
    open: Callable[[Artefact, RunnerOptions], Runner]
    targets: frozenset[str] = frozenset({"pytorch"})  # the artefact targets it runs
    timed: bool = True  # False: accuracy only (emulation is not a deployment)

    def runs(self, artefact: Artefact) -> bool:
        return artefact.kind == self.artefact_kind and artefact.target in self.targets


def check_io_shapes(where, input_shape, output_shape, options: RunnerOptions) -> None:
    """KdtoolError when a model's input (N, 3, H, W) or output (N, C) differs from the manifest's."""
    def fixed(dims):  # symbolic or dynamic dims (None, 'batch', -1) are not compared
        return [d if isinstance(d, int) and d > 0 else None for d in dims]

    expected_in = [None, *options.input_shape] if options.input_shape else None
    expected_out = [None, options.num_classes] if options.num_classes else None
    for what, shape, expected in (("input", input_shape, expected_in), ("output", output_shape, expected_out)):
        if expected is None:
            continue
        got = fixed(shape)
        if len(got) != len(expected) or any(g is not None and g != e for g, e in zip(got[1:], expected[1:])):
            raise BundleMismatch(f"{where}: {what} shape {list(shape)} differs from the manifest's "
                              f"{['batch', *expected[1:]]}")


# ---------------------------------------------------------------- PyTorch eager
class TorchRunner:
    """The float student in eager mode (the peer row of the report)."""

    max_batch = None

    def __init__(self, model: torch.nn.Module, device: torch.device, include_copies: bool):
        self.device, self.include_copies = device, include_copies
        self.on_gpu = device.type == "cuda"
        self.model = (copy.deepcopy(model).to(device) if self.on_gpu else model).eval()

    def stage(self, batch: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(batch))
        if not self.on_gpu:
            return host
        return host.pin_memory() if self.include_copies else host.to(self.device)

    @torch.inference_mode()
    def run(self, staged: torch.Tensor) -> object:
        logits = self.model(staged.to(self.device, non_blocking=True))
        if self.on_gpu:
            if self.include_copies:
                return logits.cpu()  # a blocking device-to-host copy: synchronises
            torch.cuda.synchronize(self.device)
        return logits

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)).float().cpu().numpy()


def _open_torch(device: str) -> Callable[[Artefact, RunnerOptions], Runner]:
    def open_runner(artefact: Artefact, options: RunnerOptions) -> Runner:
        return TorchRunner(artefact.model, torch.device(device), options.include_copies)
    return open_runner


# ---------------------------------------------------------------- ONNX Runtime
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRunner:
    """An ONNX Runtime session; on a GPU provider with copies excluded, inputs and outputs stay on the device."""

    max_batch = None

    def __init__(self, artefact: Artefact, providers: list, options: RunnerOptions, on_gpu: bool, emulated: bool = False):
        self.session = ort_session(artefact.path, providers=providers, threads=options.threads, emulated=emulated)
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


def _ort_providers_missing(*providers: str) -> Callable[[], str | None]:
    def reason() -> str | None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            return f"{', '.join(missing)} not in onnxruntime.get_available_providers() ({', '.join(available)})"
        return None
    return reason


# ONNX Runtime's TensorRT provider: precision comes from the graph (the FP16 ONNX, the symmetric Q/DQ ONNX).
# With trt_fp16_enable and trt_int8_enable off, ORT builds a strongly typed TensorRT network (ORT with
# TensorRT 10: microsoft/onnxruntime PR 24298; TensorRT 11 has only strongly typed networks).
TENSORRT_EP_OPTIONS = {"device_id": 0, "trt_fp16_enable": False, "trt_int8_enable": False}


def _open_ort(provider: str) -> Callable[[Artefact, RunnerOptions], Runner]:
    def open_runner(artefact: Artefact, options: RunnerOptions) -> Runner:
        if provider == "CPUExecutionProvider":
            return OrtRunner(artefact, ["CPUExecutionProvider"], options, on_gpu=False)
        chain: list = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        if provider == "TensorrtExecutionProvider":
            chain.insert(0, ("TensorrtExecutionProvider", dict(TENSORRT_EP_OPTIONS)))
        return OrtRunner(artefact, chain, options, on_gpu=True)
    return open_runner


def _open_emulated(artefact: Artefact, options: RunnerOptions) -> Runner:
    """The Q/DQ graph run node by node in float on the CPU (kdtool.export.runner, emulated=True)."""
    return OrtRunner(artefact, ["CPUExecutionProvider"], options, on_gpu=False, emulated=True)


# ---------------------------------------------------------------- native TensorRT (10.x Python API)
class TensorRTRunner:
    """A serialized TensorRT engine: one execution context, torch CUDA tensors as I/O buffers, own stream."""

    def __init__(self, artefact: Artefact, options: RunnerOptions):
        from kdtool.export.tensorrt import deserialize_engine, require_tensorrt

        trt = require_tensorrt()
        if artefact.engine is None:
            raise KdtoolError(f"{artefact.path}: cannot deserialise an engine without the build target (TensorRT "
                              f"version, GPU) its manifest entry records")
        # version, GPU and compute capability checked before the bytes are deserialised
        self.runtime, self.engine = deserialize_engine(artefact.path, artefact.engine)
        self.context = self.engine.create_execution_context()  # 8.x+, 10.x, 11.x
        self.input_name, self.output_name = options.input_name, options.output_name
        # num_io_tensors / get_tensor_name / get_tensor_dtype / get_tensor_shape: the name-based API of 8.5+, 10.x, 11.x
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        for name in (self.input_name, self.output_name):
            if name not in names:
                raise BundleMismatch(f"{artefact.path}: engine has no tensor {name!r} (it has {', '.join(sorted(names))})")
        check_io_shapes(artefact.path, list(self.engine.get_tensor_shape(self.input_name)),
                        list(self.engine.get_tensor_shape(self.output_name)), options)
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        # get_tensor_profile_shape(name, profile) -> [min, opt, max]: 10.x, 11.x
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.include_copies, self.cuda_graphs = options.include_copies, options.cuda_graphs
        self._outputs: dict[int, torch.Tensor] = {}
        self._host_outputs: dict[int, torch.Tensor] = {}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _bind(self, device_input: torch.Tensor) -> torch.Tensor:
        batch = device_input.shape[0]
        self.context.set_input_shape(self.input_name, tuple(device_input.shape))
        if batch not in self._outputs:
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            self._outputs[batch] = torch.empty(shape, dtype=self.output_dtype, device=self.device)
        output = self._outputs[batch]
        self.context.set_tensor_address(self.input_name, device_input.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        return output

    def _graph(self, like: torch.Tensor):
        batch = like.shape[0]
        if batch not in self._graphs:
            static_input = torch.empty_like(like, device=self.device)
            static_output = self._bind(static_input)
            self.context.execute_async_v3(self.stream.cuda_stream)  # TensorRT needs one run before capture
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.context.execute_async_v3(self.stream.cuda_stream)
            self._graphs[batch] = (graph, static_input, static_output)
        return self._graphs[batch]

    def _execute(self, batch: torch.Tensor) -> torch.Tensor:
        """Enqueue one inference of a host (pinned) or device batch on self.stream (the caller is inside
        `torch.cuda.stream(self.stream)`); returns the device output."""
        if self.cuda_graphs:
            graph, static_input, static_output = self._graph(batch)
            static_input.copy_(batch, non_blocking=True)
            graph.replay()
            return static_output
        output = self._bind(batch.to(self.device, non_blocking=True))
        self.context.execute_async_v3(self.stream.cuda_stream)
        return output

    def stage(self, batch: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(batch)).to(self.input_dtype)
        return host.pin_memory() if self.include_copies else host.to(self.device)

    def run(self, staged: torch.Tensor) -> object:
        with torch.cuda.stream(self.stream):
            output = self._execute(staged)
            if self.include_copies:
                batch = output.shape[0]
                if batch not in self._host_outputs:
                    self._host_outputs[batch] = torch.empty(output.shape, dtype=output.dtype).pin_memory()
                self._host_outputs[batch].copy_(output, non_blocking=True)
        self.stream.synchronize()
        return output

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(self.stream):
            logits = self._execute(torch.from_numpy(np.ascontiguousarray(batch)).to(self.input_dtype))
            logits = logits.float().cpu()  # a blocking copy on self.stream
        return logits.numpy()


def _torch_dtype(trt, dtype) -> torch.dtype:
    known = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    if dtype not in known:
        raise KdtoolError(f"unsupported TensorRT I/O dtype {dtype} (expected float32, float16 or bfloat16)")
    return known[dtype]


def _tensorrt_missing() -> str | None:
    from kdtool.export.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except KdtoolError as exc:
        return str(exc)
    return None


def _cuda_missing() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU visible to PyTorch"


ONNX_TARGETS = frozenset({"onnxruntime", "onnxruntime-cpu", "onnxruntime-gpu"})
GPU_ONNX_TARGETS = frozenset({"onnxruntime", "onnxruntime-gpu"})

RUNTIMES: Registry[Runtime] = Registry("runtime", {
    "pytorch-cpu": Runtime("pytorch-cpu", "pytorch", False, lambda: None, _open_torch("cpu")),
    "pytorch-cuda": Runtime("pytorch-cuda", "pytorch", True, _cuda_missing, _open_torch("cuda")),
    "ort-cpu": Runtime("ort-cpu", "onnx", False, _ort_providers_missing("CPUExecutionProvider"),
                       _open_ort("CPUExecutionProvider"), ONNX_TARGETS),
    "ort-emulated": Runtime("ort-emulated", "onnx", False, _ort_providers_missing("CPUExecutionProvider"),
                            _open_emulated, frozenset({"tensorrt"}), timed=False),
    "ort-cuda": Runtime("ort-cuda", "onnx", True, _ort_providers_missing("CUDAExecutionProvider"),
                        _open_ort("CUDAExecutionProvider"), GPU_ONNX_TARGETS),
    "ort-tensorrt": Runtime("ort-tensorrt", "onnx", True,
                            _ort_providers_missing("TensorrtExecutionProvider", "CUDAExecutionProvider"),
                            _open_ort("TensorrtExecutionProvider"), GPU_ONNX_TARGETS | {"tensorrt"}),
    "tensorrt": Runtime("tensorrt", "tensorrt", True, _tensorrt_missing, TensorRTRunner, frozenset({"tensorrt"})),
})
