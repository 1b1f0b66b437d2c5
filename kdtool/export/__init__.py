"""The export stage: ONNX (verified against PyTorch), INT8 Q/DQ for ONNX Runtime on CPUs and for TensorRT
(with accuracy-aware fallback), FP16, strongly typed TensorRT engines, and the portable bundle."""
from kdtool.bundle import MANIFEST_FILE, Manifest, read_manifest
from kdtool.export.stage import bundle_dir_for, export_bundle, find_latest_run, rebuild_engines, run_recipe
from kdtool.export.onnx_export import compare_logits, export_onnx, verify_logits
from kdtool.export.quantize import (
    QuantScheme, choose_reduce_range, convert_fp16, cpu_scheme, node_sensitivity, quantize_with_fallback,
    tensorrt_scheme,
)
from kdtool.export.runner import batched_logits, labelled_logits, ort_session, run_batched, session_predict
from kdtool.export.tensorrt import build_engine, check_engine_target, deserialize_engine, load_engine, require_tensorrt

__all__ = [
    "MANIFEST_FILE", "Manifest", "QuantScheme", "batched_logits", "build_engine", "bundle_dir_for",
    "check_engine_target", "choose_reduce_range", "compare_logits", "convert_fp16", "cpu_scheme",
    "deserialize_engine", "export_bundle", "export_onnx", "find_latest_run", "labelled_logits", "load_engine",
    "node_sensitivity", "ort_session", "quantize_with_fallback", "read_manifest", "rebuild_engines",
    "require_tensorrt", "run_batched", "run_recipe", "session_predict", "tensorrt_scheme", "verify_logits",
]
