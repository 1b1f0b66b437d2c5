"""The export stage: ONNX (verified against PyTorch), INT8 Q/DQ with fallback, FP16, TensorRT, bundle."""
from kdtool.export.bundle import (
    MANIFEST_FILE, bundle_dir_for, export_bundle, find_latest_run, read_manifest, rebuild_engines, run_recipe,
)
from kdtool.export.onnx_export import compare_logits, export_onnx, verify_logits
from kdtool.export.quantize import choose_reduce_range, convert_fp16, node_sensitivity, quantize_with_fallback
from kdtool.export.tensorrt import build_engine, check_engine_target, load_engine, require_tensorrt

__all__ = [
    "MANIFEST_FILE", "build_engine", "bundle_dir_for", "check_engine_target", "choose_reduce_range", "compare_logits",
    "convert_fp16", "export_bundle", "export_onnx", "find_latest_run", "load_engine", "node_sensitivity",
    "quantize_with_fallback", "read_manifest", "rebuild_engines", "require_tensorrt", "run_recipe", "verify_logits",
]
