"""INT8 explicit Q/DQ with accuracy-aware fallback, and FP16 conversion.

Two INT8 schemes, one per target runtime (`QuantScheme`):

- ``u8s8`` for ONNX Runtime on CPUs, after ONNX Runtime's CPU guidance: uint8 activations with int8
  weights in the QDQ format, and 7-bit weights (``reduce_range``) on x86 CPUs without VNNI/AMX, where
  the AVX2 u8*s8 multiply-add (vpmaddubsw) can saturate its int16 intermediate sums. Its accuracy is
  judged on ONNX Runtime's CPU integer kernels, which is what runs it.
- ``s8s8-symmetric`` for TensorRT, which supports symmetric quantisation only (int8 Q/DQ, zero points 0;
  its ONNX parser refuses others): int8 activations and weights, zero points 0, per-channel weights,
  narrow range [-127, 127] (onnxruntime's symmetric int8 range), no reduce_range, float biases (TensorRT
  takes no int32 bias DequantizeLinear), and Q/DQ only on the inputs of Conv/ConvTranspose/Gemm/MatMul
  (activation and weight), where TensorRT fuses them: the DequantizeLinear pair into the layer, the
  QuantizeLinear into the producer's epilogue; the rest of the graph stays float, as its ONNX types say.
  Its accuracy is judged by running the Q/DQ graph in float (`kdtool.export.runner`, emulated=True),
  the arithmetic TensorRT performs, not on this CPU's integer kernels.

The fallback measures each quantised node's sensitivity as the SQNR (dB) lost across it: the
SQNR of its output in the Q/DQ model against the float model, subtracted from the SQNR of the
worst dequantised activation it reads, on the calibration images (intermediate tensors are exposed by adding
them as graph outputs). The worst node is kept in float and the model re-quantised (reusing the
calibration ranges), until the top-1 drop is within tolerance or the budget is spent.
"""
from __future__ import annotations

import contextlib
import io
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from kdtool.evaluate import topk_accuracy
from kdtool.errors import CheckFailed
from kdtool.export.runner import chunks, labelled_logits, ort_session, session_predict
from kdtool.recipe import Int8Config

INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
SQNR_CAP_DB = 120.0  # reported for tensors quantisation leaves exact
RANKING_SHOWN = 5


# ------------------------------------------------------------------ settings
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags listed in /proc/cpuinfo (empty where it is unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()}


def choose_reduce_range(setting: bool | None, flags: set[str]) -> tuple[bool, str]:
    """The reduce_range to quantise with, and why."""
    if setting is not None:
        return setting, f"set in the recipe (export.int8.reduce_range: {str(setting).lower()})"
    int8_dot = sorted(set(INT8_CPU_FLAGS) & flags)
    if int8_dot:
        return False, f"this CPU has {', '.join(int8_dot)}: 8-bit U8S8 accumulates without saturation"
    if "avx2" in flags or "avx512bw" in flags:
        return True, ("x86 CPU without VNNI/AMX: 7-bit weights avoid U8S8 saturation in the AVX2 multiply-add "
                      "(ONNX Runtime's guidance)")
    return False, "not an x86 CPU with AVX2 (no U8S8 saturation risk)"


@dataclass(frozen=True)
class QuantScheme:
    """How an INT8 artefact is quantised, and whether its accuracy is judged on emulated numerics."""

    name: str  # "u8s8" or "s8s8-symmetric"
    activation_type: str  # "uint8" or "int8"
    symmetric: bool
    reduce_range: bool
    reduce_range_reason: str
    op_types: tuple[str, ...] | None  # None: every op ONNX Runtime's quantiser handles
    emulated: bool

    def describe(self, per_channel: bool) -> dict:
        """The manifest's `quantization` entry of an artefact made with this scheme."""
        return {"scheme": self.name, "activation_type": self.activation_type, "weight_type": "int8",
                "per_channel": per_channel, "symmetric": self.symmetric, "reduce_range": self.reduce_range,
                "reduce_range_reason": self.reduce_range_reason,
                "op_types": list(self.op_types) if self.op_types else None,
                "numerics": "emulated-float" if self.emulated else "onnxruntime-cpu-kernels"}


TENSORRT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def cpu_scheme(reduce_range: bool, reason: str) -> QuantScheme:
    """U8S8 for ONNX Runtime on CPUs, judged on its integer kernels."""
    return QuantScheme("u8s8", "uint8", False, reduce_range, reason, None, emulated=False)


def tensorrt_scheme() -> QuantScheme:
    """Symmetric INT8 for TensorRT, judged on emulated (float) Q/DQ numerics."""
    return QuantScheme("s8s8-symmetric", "int8", True, False,
                       "TensorRT: 8-bit int8 x int8 products accumulate in int32 (no u8s8 saturation)",
                       TENSORRT_OP_TYPES, emulated=True)


def _scheme_options(scheme: QuantScheme) -> dict:
    """quantize_static arguments of a scheme (onnxruntime.quantization, checked against 1.32's docstring)."""
    from onnxruntime.quantization import QuantType

    # ranges are collected one batch at a time, so memory stays bounded on big nets
    extra: dict = {"CalibStridedMinMax": 1}
    if scheme.symmetric:
        # symmetric int8 -> zero point 0 and the narrow range [-127, 127] (quant_utils.ONNX_INT_TYPE_SYMMETRIC_RANGE)
        extra.update(ActivationSymmetric=True, WeightSymmetric=True, QuantizeBias=False)
    if scheme.op_types:
        extra["OpTypesToExcludeOutputQuantization"] = list(scheme.op_types)
    return {"activation_type": QuantType.QInt8 if scheme.activation_type == "int8" else QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "reduce_range": scheme.reduce_range,
            "op_types_to_quantize": list(scheme.op_types) if scheme.op_types else None, "extra_options": extra}


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _calibration_reader(images: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageBatches(CalibrationDataReader):
        """Feeds preprocessed calibration images in fixed-size batches; `set_range` selects batches."""

        def __init__(self):
            self._starts = list(range(0, len(images), batch_size))
            self.set_range(0, len(self._starts))

        def __len__(self) -> int:
            return len(self._starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._pending = iter(self._starts[start_index:end_index])

        def get_next(self):
            start = next(self._pending, None)
            return None if start is None else {input_name: images[start:start + batch_size]}

    return ImageBatches()


# ------------------------------------------------------------------ TensorRT's constraints on a Q/DQ graph
# the weight axis TensorRT quantises per channel (output channels), per consumer of a DequantizeLinear'd weight
_WEIGHT_AXIS = {"Conv": lambda node, rank: 0, "ConvTranspose": lambda node, rank: 1,
                "Gemm": lambda node, rank: 0 if _attribute(node, "transB", 0) else 1,
                "MatMul": lambda node, rank: rank - 1}


def _attribute(node, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _qdq_node_violations(node, constants: dict, consumers: dict) -> list[str]:
    where = f"{node.op_type} {node.name or node.output[0]!r}"
    scale = constants.get(node.input[1]) if len(node.input) > 1 else None
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    problems = []
    if zero_point is None:
        if len(node.input) > 2 and node.input[2]:
            problems.append(f"{where}: its zero point is not a constant")
        elif _attribute(node, "output_dtype", 0) != onnx.TensorProto.INT8:
            problems.append(f"{where}: no zero point, so uint8 (TensorRT takes int8 only)")
    elif zero_point.dtype != np.int8:
        problems.append(f"{where}: zero point is {zero_point.dtype} (TensorRT takes int8 only)")
    elif np.any(zero_point != 0):
        problems.append(f"{where}: zero point {int(zero_point.flat[np.flatnonzero(zero_point)[0]])} (TensorRT takes 0 only)")
    if scale is None or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        problems.append(f"{where}: its scale is not a positive finite constant")
    elif scale.size > 1:
        weight = constants.get(node.input[0])
        if weight is None:
            problems.append(f"{where}: per-channel scales on an activation (TensorRT quantises activations per tensor)")
        for consumer, position in consumers.get(node.output[0], []):
            if weight is not None and position == 1 and consumer.op_type in _WEIGHT_AXIS:
                axis, expected = _attribute(node, "axis", 1) % weight.ndim, _WEIGHT_AXIS[consumer.op_type](consumer, weight.ndim)
                if axis != expected:
                    problems.append(f"{where}: per-channel axis {axis} for {consumer.op_type} weights "
                                    f"(TensorRT quantises axis {expected}, the output channels)")
    return problems


def tensorrt_qdq_violations(model: onnx.ModelProto) -> list[str]:
    """Where a Q/DQ graph breaks what TensorRT's ONNX parser accepts for explicit quantisation: int8 zero
    points that are 0 (symmetric), positive scales, per-tensor activations, per-channel weights only along
    the output channels. Empty when the graph fits."""
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    return [problem for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
            for problem in _qdq_node_violations(node, constants, consumers)]


# ------------------------------------------------------------------ quantisation
def preprocess_for_quantization(float_path: Path, out_path: Path) -> None:
    """ONNX Runtime's quant_pre_process: shape inference and graph optimisation (no BN left, fused ops)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(float_path), str(out_path))


def quantize_qdq(prepared_path: Path, out_path: Path, *, calibration: np.ndarray, input_name: str, cfg: Int8Config,
                 reduce_range: bool = False, scheme: QuantScheme | None = None, nodes_to_exclude: Iterable[str] = (),
                 calibration_cache: Path | None = None) -> None:
    """Static INT8 quantisation to Q/DQ with `scheme` (default: U8S8 with `reduce_range`);
    `calibration_cache` reuses ranges computed before."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    scheme = scheme or cpu_scheme(reduce_range, "given")
    reuse = calibration_cache is not None and calibration_cache.exists()
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        quantize_static(
            str(prepared_path), str(out_path),
            calibration_data_reader=None if reuse else _calibration_reader(calibration, input_name, cfg.calibration_batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel,
            nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=calibration_method(cfg.method),
            calibration_cache_path=str(calibration_cache) if calibration_cache else None,
            **_scheme_options(scheme),
        )


def top1(session, batches) -> float:
    """Top-1 accuracy (%) of an ONNX Runtime session over (images, labels) batches."""
    logits, labels = labelled_logits(session_predict(session), batches)
    return topk_accuracy(logits, labels, ks=(1,))["top1"]


# ------------------------------------------------------------------ sensitivity
@dataclass(frozen=True)
class QuantizedNode:
    name: str
    op_type: str
    inputs: tuple[tuple[str, str], ...]  # (dequantised tensor it reads, the float tensor that was quantised)
    output: str


def quantized_nodes(qdq: onnx.ModelProto) -> list[QuantizedNode]:
    """Nodes of a Q/DQ model that read at least one dequantised activation."""
    producer = {out: node for node in qdq.graph.node for out in node.output}
    found = []
    for node in qdq.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        upstream = []
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                upstream.append((name, q.input[0]))
        if upstream:
            found.append(QuantizedNode(node.name, node.op_type, tuple(upstream), node.output[0]))
    return found


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> bytes:
    """The model serialised with extra float graph outputs (intermediate activations)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {out.name for out in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names if name not in present)
    return model.SerializeToString()


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(max(signal, 1e-30) / noise))


def node_sensitivity(prepared: onnx.ModelProto, qdq: onnx.ModelProto, images: np.ndarray, batch_size: int,
                     emulated: bool = False) -> list[dict]:
    """Quantised nodes ranked by the SQNR their quantisation costs (worst first); `emulated` runs the
    Q/DQ model in float (the numerics of the TensorRT artefact)."""
    float_names = {out for node in prepared.graph.node for out in node.output} | {i.name for i in prepared.graph.input}
    nodes = [n for n in quantized_nodes(qdq)
             if n.output in float_names and all(source in float_names for _, source in n.inputs)]
    # (name in the Q/DQ model, name of the float tensor it approximates)
    pairs = sorted({(n.output, n.output) for n in nodes} | {pair for n in nodes for pair in n.inputs})
    reference = ort_session(_with_outputs(prepared, {source for _, source in pairs}))
    quantized = ort_session(_with_outputs(qdq, {name for name, _ in pairs}), emulated=emulated)
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    input_name = reference.get_inputs()[0].name
    for batch in chunks(images, batch_size):
        ref_values = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, {input_name: batch})))
        q_values = dict(zip([o.name for o in quantized.get_outputs()], quantized.run(None, {input_name: batch})))
        for pair in pairs:
            ref, got = ref_values[pair[1]].astype(np.float64), q_values[pair[0]].astype(np.float64)
            signal[pair] += float((ref ** 2).sum())
            noise[pair] += float(((ref - got) ** 2).sum())
    sqnr = {pair: _sqnr_db(signal[pair], noise[pair]) for pair in pairs}
    ranking = [{"node": n.name, "op_type": n.op_type, "output_sqnr_db": round(sqnr[(n.output, n.output)], 2),
                "sqnr_lost_db": round(min(sqnr[pair] for pair in n.inputs) - sqnr[(n.output, n.output)], 2)}
               for n in nodes]
    return sorted(ranking, key=lambda entry: entry["sqnr_lost_db"], reverse=True)


# ------------------------------------------------------------------ the INT8 stage
@dataclass
class Int8Result:
    float_top1: float
    int8_top1: float
    kept_in_float: list[str] = field(default_factory=list)
    sensitivity: list[dict] = field(default_factory=list)  # the first ranking, worst first
    steps: list[dict] = field(default_factory=list)

    @property
    def top1_drop(self) -> float:
        return self.float_top1 - self.int8_top1


def quantize_with_fallback(float_path: Path, out_path: Path, *, calibration: np.ndarray, validation, input_name: str,
                           cfg: Int8Config, reduce_range: bool = False, scheme: QuantScheme | None = None,
                           float_top1: float | None = None) -> Int8Result:
    """Quantise to Q/DQ with `scheme` (default U8S8 with `reduce_range`), keeping the most sensitive nodes
    in float until top-1 is within `cfg.max_top1_drop`.

    `validation` is a re-iterable of (images, labels) numpy batches. Top-1 and sensitivity are measured
    on the scheme's numerics (CPU integer kernels, or emulated Q/DQ for TensorRT). CheckFailed if the drop
    stays above tolerance once `cfg.fallback_budget` nodes are kept in float.
    """
    scheme = scheme or cpu_scheme(reduce_range, "given")
    with tempfile.TemporaryDirectory(prefix="kdtool-int8-") as scratch:
        prepared_path, cache = Path(scratch) / "prepared.onnx", Path(scratch) / "calibration.json"
        preprocess_for_quantization(float_path, prepared_path)
        prepared = onnx.load(str(prepared_path))
        if float_top1 is None:
            float_top1 = top1(ort_session(prepared_path), validation)
        result = Int8Result(float_top1=float_top1, int8_top1=float("nan"))
        while True:
            quantize_qdq(prepared_path, out_path, calibration=calibration, input_name=input_name, cfg=cfg,
                         scheme=scheme, nodes_to_exclude=result.kept_in_float, calibration_cache=cache)
            result.int8_top1 = top1(ort_session(out_path, emulated=scheme.emulated), validation)
            result.steps.append({"kept_in_float": list(result.kept_in_float), "top1": round(result.int8_top1, 4),
                                 "top1_drop": round(result.top1_drop, 4)})
            if result.top1_drop <= cfg.max_top1_drop or len(result.kept_in_float) >= cfg.fallback_budget:
                break
            ranking = node_sensitivity(prepared, onnx.load(str(out_path)), calibration, cfg.calibration_batch_size,
                                       emulated=scheme.emulated)
            candidates = [entry["node"] for entry in ranking if entry["node"] not in result.kept_in_float]
            if not candidates:
                break
            if not result.sensitivity:
                result.sensitivity = ranking[:RANKING_SHOWN]
            result.kept_in_float.append(candidates[0])
    if result.top1_drop > cfg.max_top1_drop:
        raise CheckFailed(
            f"INT8 ({scheme.name}) top-1 {result.int8_top1:.2f}% is {result.top1_drop:.2f} points below the float "
            f"model ({result.float_top1:.2f}%), more than export.int8.max_top1_drop={cfg.max_top1_drop:g}, with "
            f"{len(result.kept_in_float)} node(s) kept in float (export.int8.fallback_budget={cfg.fallback_budget})"
        )
    return result


# ------------------------------------------------------------------ FP16
def convert_fp16(float_path: Path, out_path: Path) -> None:
    """float16 weights and compute, float32 inputs and outputs (Cast at the boundaries)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(float_path)), keep_io_types=True), str(out_path))

