"""Native TensorRT: a bundle's serialized engine run through the Python API of TensorRT 10.12+ and 11.x.

Every boolean TensorRT returns is checked: `set_input_shape`, `set_tensor_address` and `execute_async_v3`
return False on failure (IExecutionContext in the 10.x and 11.x references) and `create_execution_context`
returns None; any of them failing is a failed case naming the engine and the batch size (exit 1), never
an uninitialised output buffer read as logits. CUDA graphs: one execution context per captured input
shape, each with its own graph, because a graph replays the state of the context it was captured from
(shape-dependent allocations, tensor addresses), which a later `set_input_shape` on that context changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdtool.bench.loading import Artefact
from kdtool.bench.runner import RunnerOptions, check_io_shapes
from kdtool.bundle import BundleMismatch
from kdtool.errors import CheckFailed, KdtoolError


@dataclass
class _Captured:
    """One execution context bound to one input shape, with the CUDA graph captured from it."""

    context: object
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: torch.Tensor


class TensorRTRunner:
    """A serialized TensorRT engine, torch CUDA tensors as I/O buffers, its own stream."""

    def __init__(self, artefact: Artefact, options: RunnerOptions):
        from kdtool.export.tensorrt import deserialize_engine, require_tensorrt

        trt = require_tensorrt()
        if artefact.engine is None:
            raise KdtoolError(f"{artefact.path}: cannot deserialise an engine without the build target (TensorRT "
                              f"version, GPU) its manifest entry records")
        # version, GPU and compute capability checked before the bytes are deserialised
        self.runtime, self.engine = deserialize_engine(artefact.path, artefact.engine)
        self.name, self.ran_on = artefact.path.name, f"TensorRT {trt.__version__}"
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
        self.context = self._new_context(0)  # runs without graphs (and every `predict`)
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}  # (id(context), batch) -> device output
        self._host_outputs: dict[int, torch.Tensor] = {}
        self._captured: dict[int, _Captured] = {}  # batch -> its own context and graph

    def _check(self, ok, batch: int, call: str) -> None:
        if not ok:
            raise CheckFailed(f"TensorRT engine {self.name}, batch {batch}: {call} failed (returned {ok!r})")

    def _new_context(self, batch: int):
        context = self.engine.create_execution_context()  # 8.x+, 10.x, 11.x; None on failure
        self._check(context, batch, "create_execution_context")
        return context

    def _bind(self, context, device_input: torch.Tensor) -> torch.Tensor:
        """Set `context`'s input shape and tensor addresses for `device_input`; returns the output buffer."""
        batch = device_input.shape[0]
        self._check(context.set_input_shape(self.input_name, tuple(device_input.shape)), batch, "set_input_shape")
        key = (id(context), batch)
        if key not in self._outputs:
            shape = tuple(context.get_tensor_shape(self.output_name))
            self._outputs[key] = torch.empty(shape, dtype=self.output_dtype, device=self.device)
        output = self._outputs[key]
        self._check(context.set_tensor_address(self.input_name, device_input.data_ptr()), batch,
                    f"set_tensor_address({self.input_name!r})")
        self._check(context.set_tensor_address(self.output_name, output.data_ptr()), batch,
                    f"set_tensor_address({self.output_name!r})")
        return output

    def _enqueue(self, context, batch: int) -> None:
        self._check(context.execute_async_v3(self.stream.cuda_stream), batch, "execute_async_v3")

    def _capture(self, like: torch.Tensor) -> _Captured:
        batch = like.shape[0]
        if batch not in self._captured:
            context = self._new_context(batch)  # a context of its own: its graph stays valid
            static_input = torch.empty_like(like, device=self.device)
            static_output = self._bind(context, static_input)
            self._enqueue(context, batch)  # TensorRT needs one run before capture (deferred allocations)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(context, batch)
            self._captured[batch] = _Captured(context, graph, static_input, static_output)
        return self._captured[batch]

    def _execute(self, batch: torch.Tensor, graphs: bool) -> torch.Tensor:
        """Enqueue one inference of a host (pinned) or device batch on self.stream (the caller is inside
        `torch.cuda.stream(self.stream)`), by replaying its shape's graph when `graphs`; returns the device output."""
        if graphs:
            captured = self._capture(batch)
            captured.static_input.copy_(batch, non_blocking=True)
            captured.graph.replay()
            return captured.static_output
        output = self._bind(self.context, batch.to(self.device, non_blocking=True))
        self._enqueue(self.context, batch.shape[0])
        return output

    def stage(self, batch: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(batch)).to(self.input_dtype)
        return host.pin_memory() if self.include_copies else host.to(self.device)

    def run(self, staged: torch.Tensor) -> object:
        with torch.cuda.stream(self.stream):
            output = self._execute(staged, self.cuda_graphs)
            if self.include_copies:
                batch = output.shape[0]
                if batch not in self._host_outputs:
                    self._host_outputs[batch] = torch.empty(output.shape, dtype=output.dtype).pin_memory()
                self._host_outputs[batch].copy_(output, non_blocking=True)
        self.stream.synchronize()
        return output

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(self.stream):
            logits = self._execute(torch.from_numpy(np.ascontiguousarray(batch)).to(self.input_dtype), graphs=False)
            logits = logits.float().cpu()  # a blocking copy on self.stream
        return logits.numpy()


def _torch_dtype(trt, dtype) -> torch.dtype:
    known = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    if dtype not in known:
        raise KdtoolError(f"unsupported TensorRT I/O dtype {dtype} (expected float32, float16 or bfloat16)")
    return known[dtype]


def tensorrt_missing() -> str | None:
    """Why native TensorRT cannot run here (not installed, too old, no CUDA GPU), or None."""
    from kdtool.export.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except KdtoolError as exc:
        return str(exc)
    return None
