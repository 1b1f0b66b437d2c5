"""Corrupt or foreign files in, one line and exit 2 out, naming the file."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import one_line_error
from kdtool.errors import KdtoolError
from kdtool.export import export_bundle
from kdtool.export.tensorrt import check_engine_target
from runs import MICRO, QUICKSTART, reference, set_args  # noqa: F401


@pytest.fixture(scope="module")
def bundle(reference, tmp_path_factory):
    return export_bundle(reference[0], out=tmp_path_factory.mktemp("bundles") / "good",
                         overrides=["export.int8.enabled=false", "export.fp16=false"], progress=False)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_safetensors_as_teacher_weights(reference, tmp_path, cli_runner):
    weights = tmp_path / "teacher.safetensors"
    shutil.copy(reference[0] / "teacher" / "last" / "model.safetensors", weights)
    truncate(weights)
    line = one_line_error(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", f"teacher.weights={weights}"))
    assert str(weights) in line and "corrupt" in line, line


def test_checkpoint_of_another_architecture(reference, cli_runner):
    student = reference[0] / "last"  # a resnet8, offered as the resnet14 teacher
    line = one_line_error(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", "teacher.name=resnet14",
                                     "--set", f"teacher.weights={student}"))
    assert str(student) in line and "does not fit the model" in line, line


def bench_error(cli_runner, bundle_dir) -> str:
    return one_line_error(cli_runner("bench", bundle_dir, "--iters", "1", "--batch", "1", "--no-progress"))


def test_truncated_onnx(bundle, tmp_path, cli_runner):
    broken = shutil.copytree(bundle, tmp_path / "bundle")
    truncate(broken / "model.fp32.onnx")
    line = bench_error(cli_runner, broken)
    assert "model.fp32.onnx" in line and "truncated" in line, line


def test_manifest_missing_or_naming_a_missing_artefact(bundle, tmp_path, cli_runner):
    no_manifest = shutil.copytree(bundle, tmp_path / "no-manifest")
    (no_manifest / "manifest.json").unlink()
    line = bench_error(cli_runner, no_manifest)
    assert str(no_manifest / "manifest.json") in line and "not found" in line, line
    dangling = shutil.copytree(bundle, tmp_path / "dangling")
    manifest = json.loads((dangling / "manifest.json").read_text())
    manifest["artefacts"]["fp32"]["file"] = "model.gone.onnx"
    (dangling / "manifest.json").write_text(json.dumps(manifest))
    line = bench_error(cli_runner, dangling)
    assert "model.gone.onnx" in line and "missing" in line, line


def test_engine_from_another_tensorrt_version(bundle):
    here = {"tensorrt_version": "10.3.0", "gpu": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}
    engine_entry = {"file": "model.trt_fp16.engine", "engine": {**here, "tensorrt_version": "8.6.1"}}
    with pytest.raises(KdtoolError) as refused:
        check_engine_target(engine_entry["engine"], here, engine_entry["file"])
    message = str(refused.value)
    assert "\n" not in message and "model.trt_fp16.engine" in message and "8.6.1 (here 10.3.0)" in message
    assert "--rebuild" in message and refused.value.exit_code == 2
    assert "tensorrt" not in sys.modules  # the check needs no TensorRT install
