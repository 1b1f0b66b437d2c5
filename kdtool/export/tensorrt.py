"""TensorRT engines from the bundle's ONNX models (TensorRT >= 10.12 and 11.x), and loading them back safely.

Networks are strongly typed: precision comes from the ONNX graph, never from builder flags (TensorRT 11
removed the FP16/INT8 builder precision flags and every other weak-typing API; 'Migrating from TensorRT 10.x to 11.x').
The FP16 engine is built from the FP16 ONNX graph (float16 compute, float32 I/O), the INT8 engine from the
symmetric Q/DQ graph made for TensorRT (explicit quantisation: scales from the Q/DQ nodes, no calibrator);
everything else runs in the precision its ONNX types say. An engine only runs on the TensorRT version and
GPU it was built for, so the manifest records both and `check_engine_target` refuses a mismatch before
anything is deserialised.

Every call below exists in the Python bindings of TensorRT 10.12 and 11.x (checked against
NVIDIA/TensorRT python/src/infer/pyCore.cpp on release/10.12 and main at 11.1, and the 11.4 Python API
reference); the version each one needs is noted where it is made.
"""
from __future__ import annotations

from pathlib import Path

from kdtool.bundle import BundleMismatch
from kdtool.errors import KdtoolError
from kdtool.recipe import TensorRTConfig

INSTALL_HINT = ("TensorRT engines are built on the machine that will run them: install TensorRT with "
                "`pip install 'kdtool[trt]'` on a Linux/Windows machine with an NVIDIA GPU and CUDA")
REBUILD_HINT = "rebuild it here with `kdtool export --trt --rebuild BUNDLE`"
MIN_VERSION = (10, 12)  # the oldest TensorRT the code is written for; pyproject's trt extra pins >=10.12,<12


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def require_tensorrt():
    """The `tensorrt` module (a supported version, a CUDA GPU visible), or KdtoolError saying what to install."""
    try:
        import tensorrt
    except ImportError:
        raise KdtoolError(f"the tensorrt Python module is not installed; {INSTALL_HINT}") from None
    if _version_tuple(tensorrt.__version__) < MIN_VERSION:
        raise KdtoolError(f"TensorRT {tensorrt.__version__} is older than {'.'.join(map(str, MIN_VERSION))}, "
                          f"the oldest kdtool builds strongly typed engines with; `pip install 'kdtool[trt]'`")
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
    """KdtoolError when an engine was built for another TensorRT version, GPU or compute capability than `here`."""
    differences = [f"{key.replace('_', ' ')} {built_for.get(key)} (here {here[key]})"
                   for key in ("tensorrt_version", "gpu", "compute_capability") if built_for.get(key) != here[key]]
    if differences:
        raise BundleMismatch(f"engine {engine_file} was built for another target: {'; '.join(differences)}; {REBUILD_HINT}")


def _strongly_typed_network(trt, builder):
    """A strongly typed network definition: the creation flag on 10.x, the default (flag deprecated) on 11.x."""
    if _version_tuple(trt.__version__) >= (11, 0):
        return builder.create_network(0)  # 11.x: strong typing is always on; STRONGLY_TYPED is ignored
    # 10.x (flag since 9.1): 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED), as the 10.x reference says
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def _parse(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)  # 10.x, 11.x
    if not parser.parse_from_file(str(onnx_path)):  # parse_from_file, num_errors, get_error: 10.x, 11.x
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KdtoolError(f"TensorRT cannot parse {onnx_path.name}: {errors}")


def _builder_config(trt, builder, cfg: TensorRTConfig, input_name: str, image_size: int, timing_cache: Path):
    config = builder.create_builder_config()
    # IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes): 8.4+, 10.x, 11.x
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    profile = builder.create_optimization_profile()  # 10.x, 11.x
    shapes = [(batch, 3, image_size, image_size) for batch in (cfg.min_batch, cfg.opt_batch, cfg.max_batch)]
    if profile.set_shape(input_name, *shapes) is False:  # setDimensions returns bool in C++; None where a binding hides it
        raise KdtoolError(f"TensorRT refused the batch profile {shapes} for input {input_name!r}")
    if config.add_optimization_profile(profile) < 0:  # the profile's index, -1 when it is invalid: 8.0+, 10.x, 11.x
        raise KdtoolError(f"TensorRT refused the batch profile {cfg.min_batch}/{cfg.opt_batch}/{cfg.max_batch} "
                          f"for input {input_name!r}")
    # The timing cache is TensorRT's own binary format (not a pickle); TensorRT rejects a foreign one.
    # create_timing_cache(bytes) / set_timing_cache(cache, ignore_mismatch): 8.0+, 10.x, 11.x
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if cache is None:
        raise KdtoolError(f"TensorRT cannot read the timing cache {timing_cache}; delete it to start a fresh one")
    # set_timing_cache returns False when the cache was made for another device or TensorRT version (with
    # ignore_mismatch=False): such timings do not hold here, so the build starts from an empty cache
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise KdtoolError("TensorRT refused an empty timing cache (set_timing_cache returned False)")
    return config


def build_engine(onnx_path: Path, engine_path: Path, *, precision: str, input_name: str, image_size: int,
                 cfg: TensorRTConfig, timing_cache: Path) -> dict:
    """Build and serialise a strongly typed engine from `onnx_path` (whose graph fixes `precision`) with a
    batch profile, updating `timing_cache`; returns the manifest's `engine` entry."""
    trt = require_tensorrt()
    if not cfg.min_batch <= cfg.opt_batch <= cfg.max_batch:
        raise KdtoolError(f"export.tensorrt: need min_batch <= opt_batch <= max_batch, got "
                          f"{cfg.min_batch}, {cfg.opt_batch}, {cfg.max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _strongly_typed_network(trt, builder)
    _parse(trt, network, logger, Path(onnx_path))
    config = _builder_config(trt, builder, cfg, input_name, image_size, Path(timing_cache))
    serialized = builder.build_serialized_network(network, config)  # IHostMemory or None: 8.0+, 10.x, 11.x
    if serialized is None:
        raise KdtoolError(f"TensorRT failed to build a {precision} engine from {Path(onnx_path).name} (see its log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))  # ITimingCache.serialize: 8.0+, 11.x
    return {**build_target(), "network": "strongly typed",
            "batch_profile": {"min": cfg.min_batch, "opt": cfg.opt_batch, "max": cfg.max_batch},
            "workspace_mib": cfg.workspace_mib}


def deserialize_engine(engine_path: Path, built_for: dict):
    """Check that an engine fits this machine (before touching its bytes), then deserialise it."""
    trt = require_tensorrt()
    check_engine_target(built_for, build_target(), Path(engine_path).name)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())  # 8.0+, 10.x, 11.x; None on failure
    if engine is None:
        raise KdtoolError(f"{engine_path}: TensorRT {trt.__version__} cannot deserialise this engine; {REBUILD_HINT}")
    return runtime, engine


def load_engine(bundle_dir: Path, key: str):
    """Deserialise the bundle's engine `key` ("trt_fp16"/"trt_int8") after checking it fits this machine."""
    from kdtool.bundle import check_file, read_manifest

    manifest = read_manifest(bundle_dir)
    entry = manifest.artefacts.get(key)
    if entry is None or entry.kind != "tensorrt":
        raise KdtoolError(f"bundle {bundle_dir} has no TensorRT engine {key!r}; build one with `kdtool export --trt`")
    path = check_file(bundle_dir, entry, f"artefact {key!r}")
    return deserialize_engine(path, entry.engine.model_dump())[1]
