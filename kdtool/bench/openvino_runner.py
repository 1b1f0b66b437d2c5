"""OpenVINO's CPU plugin running a bundle's ONNX artefacts as they are (extra `openvino`).

OpenVINO reads ONNX directly (`Core.read_model`) and compiles it for the CPU plugin
(`Core.compile_model(model, "CPU", config)`); an INT8 Q/DQ graph runs on its integer kernels. The config
(OpenVINO 2026.x Python API, `openvino.properties`): `inference_num_threads` = bench's thread count (what
ONNX Runtime gets as intra-op threads), one stream and the LATENCY performance hint (one request at a
time, as bench times every runtime), and `inference_precision` f32, so that the plugin does not lower
float layers to bf16/f16 on CPUs that have them: the row then computes what the artefact says.
"""
from __future__ import annotations

import numpy as np

from kdtool.bench.loading import Artefact
from kdtool.bench.runner import RunnerOptions, check_io_shapes
from kdtool.bundle import BundleMismatch
from kdtool.errors import KdtoolError

INSTALL_HINT = "pip install 'kdtool[openvino]'"


def _dims(partial_shape) -> list:
    return [dim.get_length() if dim.is_static else None for dim in partial_shape]


class OpenVinoRunner:
    """An ONNX artefact compiled for OpenVINO's CPU plugin, one infer request."""

    max_batch = None

    def __init__(self, artefact: Artefact, options: RunnerOptions):
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        core = ov.Core()
        try:
            model = core.read_model(str(artefact.path))
        except RuntimeError as exc:
            raise KdtoolError(f"OpenVINO cannot read {artefact.path}: {str(exc).strip().splitlines()[0]}") from None
        inputs = {name: port for port in model.inputs for name in port.get_names()}
        outputs = {name: port for port in model.outputs for name in port.get_names()}
        if options.input_name not in inputs or options.output_name not in outputs:
            raise BundleMismatch(f"{artefact.path}: no input {options.input_name!r} and output {options.output_name!r} "
                                 f"(the model has inputs {', '.join(inputs)}, outputs {', '.join(outputs)})")
        check_io_shapes(artefact.path, _dims(inputs[options.input_name].get_partial_shape()),
                        _dims(outputs[options.output_name].get_partial_shape()), options)
        config = {props.inference_num_threads(): options.threads, props.num_streams(): 1,
                  hints.performance_mode(): hints.PerformanceMode.LATENCY, hints.inference_precision(): ov.Type.f32}
        self.request = core.compile_model(model, "CPU", config).create_infer_request()
        self.input_name, self.output_name = options.input_name, options.output_name
        self.ran_on = f"OpenVINO {ov.get_version().split('-')[0]} CPU plugin"

    def stage(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch, dtype=np.float32)

    def run(self, staged: np.ndarray) -> object:
        return self.request.infer({self.input_name: staged}, share_inputs=True)  # synchronous

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({self.input_name: self.stage(batch)})
        return np.array(self.request.get_tensor(self.output_name).data, dtype=np.float32)


def openvino_missing() -> str | None:
    """Why OpenVINO's CPU plugin cannot run here, or None."""
    try:
        import openvino as ov
    except ImportError:
        return f"openvino is not installed; {INSTALL_HINT}"
    devices = ov.Core().available_devices
    return None if "CPU" in devices else f"OpenVINO has no CPU device here (devices: {', '.join(devices) or 'none'})"
