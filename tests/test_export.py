"""The export stage on one tiny real run: ONNX vs PyTorch, manifest, the two INT8 artefacts (U8S8 for the
CPU, symmetric for TensorRT, judged on emulated Q/DQ), FP16, the reference set, the bundle used with
onnxruntime + numpy alone, bad inputs through the CLI, TensorRT skips."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kdtool.cli import cli
from kdtool.data import build_datasets
from kdtool.errors import CheckFailed, KdtoolError
from kdtool.bundle import ARTEFACTS, REFERENCE_BUDGET_BYTES, reference_count
from kdtool.export import check_engine_target, choose_reduce_range, export_bundle, find_latest_run, tensorrt_scheme
from kdtool.export.onnx_export import export_onnx, ort_session, run_batched, torch_logits
from kdtool.export.images import ValidationBatches, preprocess
from kdtool.export.quantize import quantize_with_fallback
from kdtool.io import sha256_file
from kdtool.recipe import Int8Config, load_recipe, recipe_from_dict
from kdtool.rundir import load_teacher
from kdtool.train import distill, load_student

TINY_RECIPE = {
    "name": "tiny", "seed": 0,
    "data": {"name": "digits", "image_size": 16, "train_fraction": 0.3, "batch_size": 32},
    "teacher": {"name": "resnet8", "train": {"epochs": 1}},
    "student": {"name": "resnet8"},
    "train": {"epochs": 1},
    "export": {"int8": {"calibration_images": 64}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    distill(recipe_from_dict(TINY_RECIPE), run, progress=False)
    return run


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    return export_bundle(run_dir, out=tmp_path_factory.mktemp("export") / "tiny", progress=False)


@pytest.fixture(scope="module")
def manifest(bundle) -> dict:
    """manifest.json as plain JSON (what any consumer reads)."""
    return json.loads((bundle / "manifest.json").read_text())


def test_onnx_matches_pytorch_at_batch_sizes(run_dir, bundle, manifest):
    recipe = load_recipe(run_dir / "recipe.yaml")
    datasets = build_datasets(recipe.data)
    images, _ = ValidationBatches(datasets.val, datasets.info, recipe.data).head(64)
    reference = torch_logits(load_student(run_dir, recipe, datasets.info), images)
    session = ort_session(bundle / manifest["artefacts"]["fp32"]["file"])
    for batch_size in (1, 7, 32):
        assert np.abs(run_batched(session, images, batch_size) - reference).max() < 1e-3
    figures = manifest["artefacts"]["fp32"]["verification"]["batch_sizes"]
    assert set(figures) == {"1", "7", "32"}
    assert all(f["max_abs_diff"] < 1e-3 and f["top1_agreement"] >= 0.99 for f in figures.values())
    proto = onnx.load(str(bundle / "model.fp32.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.opset_import[0].version == 17


def test_manifest_content(run_dir, bundle, manifest):
    assert manifest["format"] == {"name": "kdtool-bundle", "version": 3}
    assert manifest["input"]["name"] == "images" and manifest["output"]["name"] == "logits"
    assert manifest["input"]["shape"] == ["batch", 3, 16, 16] and manifest["output"]["shape"] == ["batch", 10]
    pre = manifest["preprocessing"]
    assert pre["layout"] == "NCHW" and pre["channels"] == "RGB" and len(pre["mean"]) == 3 and len(pre["class_names"]) == 10
    provenance = manifest["provenance"]
    assert Path(provenance["run_dir"]) == run_dir.resolve()
    assert provenance["recipe_sha256"] == load_recipe(bundle / "recipe.yaml").digest()
    assert provenance["checkpoint_sha256"] == sha256_file(run_dir / "best" / "model.safetensors")
    targets = {key: entry["target"] for key, entry in manifest["artefacts"].items()}
    assert targets == {"fp32": "any", "int8": "cpu", "int8_trt": "tensorrt", "fp16": "gpu"}
    assert {key: ARTEFACTS[key].target for key in targets} == targets  # the table is where they come from
    for entry in manifest["artefacts"].values():
        assert entry["kind"] == "onnx" and entry["sha256"] == sha256_file(bundle / entry["file"])
        assert entry["size_bytes"] == (bundle / entry["file"]).stat().st_size
    assert {"kdtool", "torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    calibration = manifest["calibration"]
    assert calibration["images"] == 64 == len(calibration["indices"]) and calibration["split"] == "train"
    cpu = manifest["artefacts"]["int8"]["quantization"]
    assert cpu["scheme"] == "u8s8" and cpu["activation_type"] == "uint8" and cpu["numerics"] == "onnxruntime-cpu-kernels"
    assert isinstance(cpu["reduce_range"], bool) and cpu["reduce_range_reason"]
    trt = manifest["artefacts"]["int8_trt"]["quantization"]
    assert (trt["scheme"], trt["activation_type"], trt["symmetric"], trt["reduce_range"], trt["numerics"]) == \
        ("s8s8-symmetric", "int8", True, False, "emulated-float")
    assert not list(bundle.parent.glob(".*partial*")) and not (bundle / ".kdtool-bundle-staging").exists()


@pytest.mark.parametrize("key", ["int8", "int8_trt"])
def test_int8_is_qdq_and_its_drop_is_measured(bundle, manifest, key):
    int8 = manifest["artefacts"][key]
    ops = {node.op_type for node in onnx.load(str(bundle / int8["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    accuracy = int8["verification"]["accuracy"]
    assert accuracy["images"] == 360 and accuracy["numerics"] == int8["quantization"]["numerics"]
    assert accuracy["top1_drop"] == pytest.approx(accuracy["float_top1"] - accuracy["int8_top1"], abs=1e-3)
    assert accuracy["top1_drop"] <= accuracy["max_top1_drop"]


def _qdq_zero_points(model: onnx.ModelProto) -> list[tuple[str, int, np.ndarray]]:
    """(node, zero point dtype, zero point values) of every QuantizeLinear/DequantizeLinear."""
    constants = {init.name: init for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(node.input) == 3 and node.input[2] in constants, f"{node.name} has no constant zero point"
            zero_point = constants[node.input[2]]
            found.append((node.name, zero_point.data_type, onnx.numpy_helper.to_array(zero_point)))
    return found


def test_tensorrt_int8_is_symmetric_with_zero_points_0(bundle, manifest):
    """TensorRT takes INT8 Q/DQ with zero points 0 only, weights in [-127, 127]; the CPU artefact is U8S8."""
    trt = onnx.load(str(bundle / manifest["artefacts"]["int8_trt"]["file"]))
    zero_points = _qdq_zero_points(trt)
    assert len(zero_points) >= 4
    for name, dtype, values in zero_points:
        assert dtype == onnx.TensorProto.INT8 and not values.any(), f"{name}: zero point {values} ({dtype})"
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in trt.graph.initializer}
    weights = [constants[n.input[0]] for n in trt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert weights and all(w.dtype == np.int8 and w.min() >= -127 for w in weights)
    cpu = _qdq_zero_points(onnx.load(str(bundle / manifest["artefacts"]["int8"]["file"])))
    assert any(dtype == onnx.TensorProto.UINT8 for _, dtype, _ in cpu)  # the check above can fail: U8S8 does


INTEGER_KERNELS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "QLinearAdd",
                   "QLinearGlobalAveragePool", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


@pytest.mark.parametrize("key", ["int8", "int8_trt"])
def test_emulated_numerics_run_no_integer_kernel(bundle, manifest, key, tmp_path):
    """ORT with graph optimisations off keeps the Q/DQ graph as written: float Conv/Gemm on dequantised
    values, no integer kernel; the full optimisation of the CPU artefact does fuse integer kernels."""
    path = bundle / manifest["artefacts"][key]["file"]
    ort_session(path, emulated=True, optimized_model_path=tmp_path / "emulated.onnx")
    emulated_ops = {node.op_type for node in onnx.load(str(tmp_path / "emulated.onnx")).graph.node}
    assert not emulated_ops & INTEGER_KERNELS and {"Conv", "QuantizeLinear", "DequantizeLinear"} <= emulated_ops
    if key == "int8":
        ort_session(path, optimized_model_path=tmp_path / "full.onnx")
        assert {node.op_type for node in onnx.load(str(tmp_path / "full.onnx")).graph.node} & INTEGER_KERNELS


def test_reference_set_in_the_bundle(run_dir, bundle, manifest):
    """uint8 validation images as the preprocessing expects, labels, teacher and float-student logits."""
    reference = manifest["reference"]
    arrays = {name: np.load(bundle / reference[name]["file"], allow_pickle=False)
              for name in ("images", "labels", "teacher_logits", "student_logits")}
    recipe = load_recipe(run_dir / "recipe.yaml")
    datasets = build_datasets(recipe.data)
    count = reference["count"]
    assert count == 360 == len(datasets.val)  # the quickstart's whole validation set fits the budget
    assert arrays["images"].dtype == np.uint8 and arrays["images"].shape == (count, 3, 16, 16)
    assert arrays["labels"].tolist() == [int(datasets.val[i][1]) for i in range(count)]
    inputs = preprocess(torch.from_numpy(arrays["images"][:64]), datasets.info)
    student = torch_logits(load_student(run_dir, recipe, datasets.info), inputs)
    teacher = torch_logits(load_teacher(run_dir, recipe, datasets.info), inputs)
    assert np.allclose(arrays["student_logits"][:64], student, atol=1e-5)
    assert np.allclose(arrays["teacher_logits"][:64], teacher, atol=1e-5)
    for name, entry in reference.items():
        if isinstance(entry, dict):
            assert entry["sha256"] == sha256_file(bundle / entry["file"])


def test_reference_set_size_is_capped():
    assert reference_count(1000, 360, 16, 10) == 360
    imagenet = reference_count(1000, 50_000, 224, 1000)
    assert 300 < imagenet < 1000 and imagenet * (3 * 224 * 224 + 8 + 8000) <= REFERENCE_BUDGET_BYTES
    assert reference_count(10, 50_000, 224, 1000) == 10


def test_reference_set_size_follows_the_recipe(run_dir, tmp_path):
    small = export_bundle(run_dir, out=tmp_path / "small", progress=False,
                          overrides=["export.reference_images=40", "export.int8.enabled=false", "export.fp16=false"])
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["reference"]["count"] == 40
    assert np.load(small / manifest["reference"]["labels"]["file"]).shape == (40,)


def test_tensorrt_scheme_fallback_is_judged_on_emulated_numerics(sensitive):
    """The fallback of the TensorRT artefact measures emulated Q/DQ top-1 (not the CPU's integer kernels)."""
    path, calibration, validation = sensitive
    out = path.with_name("int8_trt.onnx")
    result = quantize_with_fallback(path, out, calibration=calibration, validation=validation, input_name="images",
                                    cfg=Int8Config(calibration_images=64, max_top1_drop=2), scheme=tensorrt_scheme())
    emulated = run_batched(ort_session(out, emulated=True), validation[0][0], 50).argmax(1)
    assert result.int8_top1 == pytest.approx(100 * float((emulated == validation[0][1]).mean()))
    assert result.top1_drop <= 2 and result.steps[0]["top1_drop"] > 10


def test_fp16_verified_or_marked_unverified(bundle, manifest):
    fp16 = manifest["artefacts"]["fp16"]
    assert fp16["precision"] == "fp16"
    graph = onnx.load(str(bundle / fp16["file"])).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    verification = fp16["verification"]
    assert verification.startswith("unverified: ") if isinstance(verification, str) else \
        all(f["top1_agreement"] >= 0.98 for f in verification["batch_sizes"].values())


BUNDLE_CLIENT = r"""
import sys; sys.modules["torch"] = None  # any torch import fails
import json, pathlib
import numpy as np, onnxruntime as ort
bundle = pathlib.Path(sys.argv[1])
manifest = json.loads((bundle / "manifest.json").read_text())
pre = manifest["preprocessing"]
uint8 = np.load(sys.argv[2])  # (N, 3, H, W) RGB uint8, the manifest's size
x = uint8.astype(np.float32) / 255
x = (x - np.array(pre["mean"], np.float32)[:, None, None]) / np.array(pre["std"], np.float32)[:, None, None]
results = {}
for key, entry in manifest["artefacts"].items():
    session = ort.InferenceSession(str(bundle / entry["file"]), providers=["CPUExecutionProvider"])
    logits = session.run([manifest["output"]["name"]], {manifest["input"]["name"]: x.astype(np.float32)})[0]
    assert logits.shape == (64, len(pre["class_names"])) and np.isfinite(logits).all()
    results[key] = logits.argmax(1).tolist()
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print(json.dumps(results))
"""


def test_bundle_runs_with_onnxruntime_and_numpy_alone(run_dir, bundle, tmp_path):
    datasets = build_datasets(load_recipe(run_dir / "recipe.yaml").data)
    np.save(tmp_path / "images.npy", torch.stack([datasets.val[i][0] for i in range(64)]).numpy())
    done = subprocess.run([sys.executable, "-c", BUNDLE_CLIENT, str(bundle), str(tmp_path / "images.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    predictions = json.loads(done.stdout)
    assert set(predictions) == {"fp32", "int8", "int8_trt", "fp16"}
    assert predictions["fp16"] == predictions["fp32"]


class SensitiveNet(nn.Module):
    """conv1 has one channel 1000x larger than the rest, which conv2 ignores: per-tensor activation
    quantisation of conv1's output wipes out what conv2 reads, unless both stay in float."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(512, 10)
        with torch.no_grad():
            self.conv1.weight[0] *= 1000
            self.conv2.weight[:, 0] = 0

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).flatten(1))


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sensitive") / "float.onnx"
    export_onnx(SensitiveNet().eval(), path, image_size=8, opset=17)
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    images = rng.standard_normal((200, 3, 8, 8)).astype(np.float32)
    labels = run_batched(ort_session(path), images, 50).argmax(1)
    return path, calibration, [(images, labels)]


def test_fallback_keeps_sensitive_nodes_in_float(sensitive):
    path, calibration, validation = sensitive
    result = quantize_with_fallback(path, path.with_name("int8.onnx"), calibration=calibration, validation=validation,
                                    input_name="images", cfg=Int8Config(calibration_images=64, max_top1_drop=2),
                                    reduce_range=True)
    assert result.steps[0]["top1_drop"] > 10  # the forced failure of plain INT8
    assert set(result.kept_in_float) == {"/conv1/Conv", "/conv2/Conv"}
    assert result.top1_drop <= 2
    assert result.sensitivity[0]["sqnr_lost_db"] >= result.sensitivity[-1]["sqnr_lost_db"]


def test_fallback_out_of_budget_fails_the_check(sensitive):
    path, calibration, validation = sensitive
    with pytest.raises(CheckFailed, match="max_top1_drop"):
        quantize_with_fallback(path, path.with_name("int8.onnx"), calibration=calibration, validation=validation,
                               input_name="images", cfg=Int8Config(calibration_images=64, max_top1_drop=2,
                                                                   fallback_budget=1), reduce_range=True)


def test_reduce_range_follows_the_cpu():
    assert choose_reduce_range(None, {"avx2", "fma"})[0] is True
    assert choose_reduce_range(None, {"avx2", "avx512_vnni"})[0] is False
    assert choose_reduce_range(False, {"avx2"}) == (False, "set in the recipe (export.int8.reduce_range: false)")


def test_find_latest_run(run_dir, tmp_path):
    assert find_latest_run(run_dir.parent) == run_dir
    with pytest.raises(KdtoolError, match="no finished run"):
        find_latest_run(tmp_path)


# ------------------------------------------------------------------ bad inputs via the CLI
def _export(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["export", *args, "--no-progress"])
    return result.exit_code, result.output


def _assert_one_line_error(code: int, output: str, fragment: str) -> None:
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], output
    assert "Traceback" not in output


def test_existing_bundle_needs_overwrite(run_dir, bundle):
    _assert_one_line_error(*_export(str(run_dir), "--out", str(bundle)), "--overwrite")


def test_run_without_checkpoint(run_dir, tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
    _assert_one_line_error(*_export(str(empty), "--out", str(tmp_path / "b")), "no best student checkpoint")
    assert not (tmp_path / "b").exists()


def test_checkpoint_that_does_not_fit_the_model(run_dir, tmp_path):
    code, output = _export(str(run_dir), "--out", str(tmp_path / "b"), "--set", "export.name=x")
    assert code == 0, output  # control: the override path works
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "best").symlink_to((run_dir / "best").resolve())
    (wrong / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text().replace("name: resnet8\n", "name: resnet14\n"))
    _assert_one_line_error(*_export(str(wrong), "--out", str(tmp_path / "c")), "does not fit the model")
    assert not (tmp_path / "c").exists()


def test_calibration_set_smaller_than_asked(run_dir, tmp_path):
    _assert_one_line_error(*_export(str(run_dir), "--out", str(tmp_path / "b"), "--set",
                                    "export.int8.calibration_images=100000"), "calibration_images")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".*partial*"))


def test_unwritable_output_dir(run_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _assert_one_line_error(*_export(str(run_dir), "--out", str(blocker / "bundle")), "cannot create the bundle directory")


def test_overrides_outside_export_are_refused(run_dir, tmp_path):
    _assert_one_line_error(*_export(str(run_dir), "--out", str(tmp_path / "b"), "--set", "train.epochs=3"), "export.")


# ------------------------------------------------------------------ TensorRT
def test_trt_without_tensorrt_says_what_to_install(run_dir, tmp_path):
    try:
        import tensorrt  # noqa: F401
        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present")
    except ImportError:
        pass
    _assert_one_line_error(*_export(str(run_dir), "--trt", "--out", str(tmp_path / "b")), "pip install 'kdtool[trt]'")


def test_engine_for_another_target_is_refused():
    built = {"tensorrt_version": "10.3.0", "gpu": "NVIDIA A100", "compute_capability": "8.0"}
    here = {"tensorrt_version": "10.3.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    check_engine_target(built, built, "model.trt_fp16.engine")
    with pytest.raises(KdtoolError, match="kdtool export --trt --rebuild"):
        check_engine_target(built, here, "model.trt_fp16.engine")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need an NVIDIA GPU with CUDA")
def test_trt_engines_built_and_loaded(run_dir, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT engines need `pip install 'kdtool[trt]'`")
    from kdtool.export import load_engine

    bundle = export_bundle(run_dir, out=tmp_path / "trt", trt=True, progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"trt_fp16", "trt_int8"} <= set(manifest["artefacts"]) and (bundle / "tensorrt.timing.cache").exists()
    assert manifest["artefacts"]["trt_int8"]["source"] == "model.int8_trt.onnx"
    assert manifest["artefacts"]["trt_fp16"]["engine"]["network"] == "strongly typed"
    assert load_engine(bundle, "trt_int8") is not None
