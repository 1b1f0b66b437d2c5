"""Runtimes that run a bundle's artefacts: a small registry; each entry says whether it is available
here and, when not, why.

A runtime opens an artefact as a `Runner`: `stage` prepares one input batch before timing (on the
device when host-device copies are excluded), `run` is one timed, synchronous inference on a staged
batch, `predict` returns float32 logits for accuracy. onnx artefacts run on ONNX Runtime providers,
tensorrt engines on native TensorRT, the float student on PyTorch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from kdtool.bench.bundle import Artefact
from kdtool.errors import KdtoolError, Registry


@dataclass(frozen=True)
class RunnerOptions:
    input_name: str
    output_name: str
    threads: int
    include_copies: bool
    cuda_graphs: bool


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

    def __init__(self, artefact: Artefact, providers: list, options: RunnerOptions, on_gpu: bool):
        import onnxruntime as ort

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = 1
        session_options.log_severity_level = 3
        self.session = ort.InferenceSession(str(artefact.path), session_options, providers=providers)
        inputs = {node.name: node for node in self.session.get_inputs()}
        if options.input_name not in inputs:
            raise KdtoolError(f"{artefact.path}: no input named {options.input_name!r} (the model has {', '.join(inputs)})")
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


def _open_ort(provider: str) -> Callable[[Artefact, RunnerOptions], Runner]:
    def open_runner(artefact: Artefact, options: RunnerOptions) -> Runner:
        if provider == "CPUExecutionProvider":
            return OrtRunner(artefact, ["CPUExecutionProvider"], options, on_gpu=False)
        chain: list = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        if provider == "TensorrtExecutionProvider":
            # QDQ models need INT8 enabled in the TensorRT provider; fp16 layers need FP16 enabled.
            trt_options = {"device_id": 0, "trt_fp16_enable": artefact.precision == "fp16",
                           "trt_int8_enable": artefact.precision == "int8"}
            chain.insert(0, ("TensorrtExecutionProvider", trt_options))
        return OrtRunner(artefact, chain, options, on_gpu=True)
    return open_runner


# ---------------------------------------------------------------- native TensorRT (10.x Python API)
class TensorRTRunner:
    """A serialized TensorRT engine: one execution context, torch CUDA tensors as I/O buffers, own stream."""

    def __init__(self, artefact: Artefact, options: RunnerOptions):
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(artefact.path.read_bytes())
        if self.engine is None:
            raise KdtoolError(f"{artefact.path}: TensorRT {trt.__version__} cannot deserialise this engine "
                              "(built for another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = options.input_name, options.output_name
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        for name in (self.input_name, self.output_name):
            if name not in names:
                raise KdtoolError(f"{artefact.path}: engine has no tensor {name!r} (it has {', '.join(sorted(names))})")
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
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
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install 'kdtool[trt]')"
    return None if torch.cuda.is_available() else "no CUDA GPU visible to PyTorch"


def _cuda_missing() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU visible to PyTorch"


RUNTIMES: Registry[Runtime] = Registry("runtime", {
    "pytorch-cpu": Runtime("pytorch-cpu", "pytorch", False, lambda: None, _open_torch("cpu")),
    "pytorch-cuda": Runtime("pytorch-cuda", "pytorch", True, _cuda_missing, _open_torch("cuda")),
    "ort-cpu": Runtime("ort-cpu", "onnx", False, _ort_providers_missing("CPUExecutionProvider"),
                       _open_ort("CPUExecutionProvider")),
    "ort-cuda": Runtime("ort-cuda", "onnx", True, _ort_providers_missing("CUDAExecutionProvider"),
                        _open_ort("CUDAExecutionProvider")),
    "ort-tensorrt": Runtime("ort-tensorrt", "onnx", True,
                            _ort_providers_missing("TensorrtExecutionProvider", "CUDAExecutionProvider"),
                            _open_ort("TensorrtExecutionProvider")),
    "tensorrt": Runtime("tensorrt", "tensorrt", True, _tensorrt_missing, TensorRTRunner),
})
