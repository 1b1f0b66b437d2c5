"""TensorRT 10 engines from the bundle's ONNX models, and loading them back safely.

FP16 engines are built from the FP32 ONNX model with the FP16 builder flag; INT8 engines from the
Q/DQ model with the INT8 flag (explicit quantisation: the scales come from the Q/DQ nodes, no
calibrator). An engine only runs on the TensorRT version and GPU model it was built for, so the
manifest records both and `load_engine` refuses a mismatch.
"""
from __future__ import annotations

from pathlib import Path

from kdtool.errors import KdtoolError
from kdtool.recipe import TensorRTConfig

INSTALL_HINT = ("TensorRT engines are built on the machine that will run them: install TensorRT with "
                "`pip install 'kdtool[trt]'` on a Linux/Windows machine with an NVIDIA GPU and CUDA")
REBUILD_HINT = "rebuild it here with `kdtool export --trt --rebuild`"
TIMING_CACHE_FILE = "tensorrt.timing.cache"


def require_tensorrt():
    """The `tensorrt` module, or KdtoolError saying what to install and where it runs."""
    try:
        import tensorrt
    except ImportError:
        raise KdtoolError(f"the tensorrt Python module is not installed; {INSTALL_HINT}") from None
    import torch

    if not torch.cuda.is_available():
        raise KdtoolError(f"no NVIDIA GPU with CUDA is visible; {INSTALL_HINT}")
    return tensorrt


def build_target() -> dict:
    """TensorRT version, GPU name and compute capability of this machine."""
    import torch

    trt = require_tensorrt()
    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt_version": trt.__version__, "gpu": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}.{minor}"}


def check_engine_target(built_for: dict, here: dict, engine_file: str) -> None:
    """KdtoolError when an engine was built for another TensorRT version or GPU than `here`."""
    differences = [f"{key.replace('_', ' ')} {built_for.get(key)} (here {here[key]})"
                   for key in ("tensorrt_version", "gpu", "compute_capability") if built_for.get(key) != here[key]]
    if differences:
        raise KdtoolError(f"engine {engine_file} was built for another target: {'; '.join(differences)}; {REBUILD_HINT}")


def build_engine(onnx_path: Path, engine_path: Path, *, precision: str, input_name: str, image_size: int,
                 cfg: TensorRTConfig, timing_cache: Path) -> dict:
    """Build and serialise an engine ("fp16" or "int8") with a batch profile; returns its metadata."""
    trt = require_tensorrt()
    if not cfg.min_batch <= cfg.opt_batch <= cfg.max_batch:
        raise KdtoolError(f"export.tensorrt: need min_batch <= opt_batch <= max_batch, got "
                          f"{cfg.min_batch}, {cfg.opt_batch}, {cfg.max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KdtoolError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *[(batch, 3, image_size, image_size)
                                    for batch in (cfg.min_batch, cfg.opt_batch, cfg.max_batch)])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise KdtoolError(f"TensorRT failed to build a {precision} engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {**build_target(), "batch_profile": {"min": cfg.min_batch, "opt": cfg.opt_batch, "max": cfg.max_batch},
            "workspace_mib": cfg.workspace_mib, "builder_flags": ["FP16", "INT8"] if precision == "int8" else ["FP16"]}


def load_engine(bundle_dir: Path, key: str):
    """Deserialise the bundle's engine `key` ("trt_fp16"/"trt_int8") after checking it fits this machine."""
    from kdtool.export.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    entry = manifest["artefacts"].get(key)
    if entry is None or entry.get("kind") != "tensorrt":
        raise KdtoolError(f"bundle {bundle_dir} has no TensorRT engine {key!r}; build one with `kdtool export --trt`")
    trt = require_tensorrt()
    check_engine_target(entry["engine"], build_target(), entry["file"])
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((Path(bundle_dir) / entry["file"]).read_bytes())
    if engine is None:
        raise KdtoolError(f"engine {entry['file']} could not be deserialised; {REBUILD_HINT}")
    return engine
