"""What bench is given must be what it judges (issue 19): `kdtool bench --data DIR` reads DIR as the bundle's
dataset or refuses it in one line (exit 2); a gate never passes over a teacher at chance on the data (exit 1);
the TensorRT INT8 artefact's Q/DQ constraints are checked before it is judged (exit 2: the file does not fit
what its manifest says it is); reference arrays are checked against their manifest shapes before loading.

Families (tests/reliability/figures.py): bench_data, artefact_constraints; each `with trials.trial()` block is
one counted trial.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from conftest import one_line_error
from kdtool.export import export_bundle
from kdtool.io import sha256_file
from kdtool.recipe import load_recipe
from kdtool.train import distill
from runs import MICRO, QUICKSTART

FAST_BENCH = ["--iters", "1", "--batch", "1", "--no-progress"]
CLASSES = ("blue", "green", "red")  # the dominant channel of each class's images: a teacher learns it at once


def colour_folder(root: Path, classes=CLASSES, per_class=(20, 10)) -> Path:
    """train/ and val/ of 8x8 PNGs whose class is the brightest channel."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (8, 8, 3), dtype=np.uint8)
                pixels[..., ("red", "green", "blue").index(name) if name in CLASSES else 0] += 160
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(bundle, its data root): a run on an ImageFolder of three colours, exported FP32 only."""
    base = tmp_path_factory.mktemp("folder")
    root = colour_folder(base / "data")
    overrides = [*MICRO, "data.name=imagefolder", f"data.root={root}", "data.batch_size=8", "data.train_fraction=1",
                 "augment.jda.policy=null", "teacher.train.epochs=4", "train.epochs=2"]
    distill(load_recipe(QUICKSTART, overrides), base / "run", progress=False)
    bundle = export_bundle(base / "run", out=base / "bundle", progress=False,
                           overrides=["export.int8.enabled=false", "export.fp16=false"])
    return bundle, root


def _relabel_val(root: Path, mapping: dict) -> None:
    """Swap the contents of the val/ class folders (names kept): every label now names another class."""
    val = root / "val"
    for name in mapping:
        (val / name).rename(val / f"{name}.tmp")
    for old, new in mapping.items():
        (val / f"{old}.tmp").rename(val / new)


def _variant(root: Path, where: Path, edit) -> Path:
    copy = Path(shutil.copytree(root, where))
    edit(copy)
    return copy


def test_bench_reads_the_data_it_is_given_or_refuses_it(folder_bundle, tmp_path, cli_runner, fault_trials):
    trials = fault_trials("bench_data")
    bundle, root = folder_bundle
    with trials.trial():  # the bundle's own data: read, every validation image counted
        result = cli_runner("bench", bundle, "--data", root, *FAST_BENCH)
        assert result.exit_code == 0, result.output
        data = json.loads((bundle / "report.json").read_text())["settings"]["data"]
        assert data["source"] == "validation" and data["images"] == 30 and str(root) in data["description"]
    refused = {  # --data DIR -> a fragment of the one error line
        "missing": (tmp_path / "nowhere", "not a directory"),
        "a file": (_variant(root, tmp_path / "file", lambda r: None) / "val" / "red" / "0.png", "not a directory"),
        "another dataset kind": (_variant(root, tmp_path / "cifar", lambda r: [shutil.rmtree(r / "train"),
                                                                            (r / "cifar-100-python").mkdir()]),
                                 "not a 'imagefolder' dataset root"),
        "class folders renamed": (_variant(root, tmp_path / "renamed", lambda r: [
            (r / split / old).rename(r / split / new) for split in ("train", "val")
            for old, new in zip(CLASSES, ("cat", "dog", "eel"))]), "not the bundle's data"),
        "a class missing": (_variant(root, tmp_path / "fewer", lambda r: [shutil.rmtree(r / split / "red")
                                                                          for split in ("train", "val")]),
                            "not the bundle's data"),
    }
    for name, (directory, fragment) in refused.items():
        with trials.trial():
            line = one_line_error(cli_runner("bench", bundle, "--data", directory, *FAST_BENCH))
            assert fragment in line and str(directory) in line, f"{name}: {line}"
    with trials.trial():  # the same class names over other images: the teacher is at chance, the gate fails
        shuffled = _variant(root, tmp_path / "shuffled", lambda r: _relabel_val(r, dict(zip(CLASSES, CLASSES[1:] + CLASSES[:1]))))
        result = cli_runner("bench", bundle, "--data", shuffled, *FAST_BENCH)
        assert result.exit_code == 1 and "teacher_top1_above_chance" in result.output, result.output
        assert "gate passed" not in result.output and "Traceback" not in result.output


def _rewrite_reference(bundle: Path, name: str, array=None, raw: bytes | None = None) -> None:
    path = bundle / "reference" / f"{name}.npy"
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.save(path, array, allow_pickle=False)
    data = json.loads((bundle / "manifest.json").read_text())
    data["reference"][name].update(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(data))


def _huge_header(bundle: Path) -> None:
    header = np.lib.format.header_data_from_array_1_0(np.zeros(3, np.int64))
    header["shape"] = (10 ** 12,)
    stream = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    _rewrite_reference(bundle, "labels", raw=stream.getvalue() + b"\x00" * 64)


def test_reference_arrays_and_labels_are_checked(folder_bundle, tmp_path, cli_runner, fault_trials):
    trials = fault_trials("bench_data")
    bundle, _ = folder_bundle
    labels = np.load(bundle / "reference" / "labels.npy")
    cases = {  # damage -> exit code and a fragment of the output
        "header claiming 10**12 labels": (_huge_header, 2, "header says int64 [1000000000000]"),
        "labels as float64": (lambda b: _rewrite_reference(b, "labels", labels.astype(np.float64)), 2, "float64"),
        "images in Fortran order": (lambda b: _rewrite_reference(b, "images", np.asfortranarray(
            np.load(b / "reference" / "images.npy"))), 2, "Fortran order"),
        "labels shifted: the teacher at chance": (lambda b: _rewrite_reference(b, "labels", (labels + 1) % 3), 1,
                                                  "teacher_top1_above_chance"),
    }
    for name, (damage, code, fragment) in cases.items():
        with trials.trial():
            copy = Path(shutil.copytree(bundle, tmp_path / name.replace(" ", "_").replace("*", "")))
            damage(copy)
            result = cli_runner("bench", copy, *FAST_BENCH)
            assert result.exit_code == code and fragment in result.output, f"{name}: {result.output}"
            assert "Traceback" not in result.output and "gate passed" not in result.output
            if code == 2:
                one_line_error(result)


# ------------------------------------------------------------------ the TensorRT INT8 artefact's constraints
@pytest.fixture(scope="module")
def int8_bundle(folder_bundle, tmp_path_factory) -> Path:
    run = folder_bundle[0].parent / "run"
    return export_bundle(run, out=tmp_path_factory.mktemp("int8") / "bundle", progress=False,
                         overrides=["export.fp16=false", "export.int8.calibration_images=16"])


def _edit_int8_trt(bundle: Path, edit) -> None:
    path = bundle / "model.int8_trt.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    data = json.loads((bundle / "manifest.json").read_text())
    data["artefacts"]["int8_trt"].update(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(data))


def _qdq(model, op_type: str, on_weight: bool):
    weights = {init.name for init in model.graph.initializer}
    return next(node for node in model.graph.node if node.op_type == op_type and (node.input[0] in weights) == on_weight)


def _set_initializer(model, name: str, value: np.ndarray) -> None:
    init = next(init for init in model.graph.initializer if init.name == name)
    init.CopyFrom(numpy_helper.from_array(value, name))


def _activation_zero_point(value: np.ndarray):
    return lambda model: _set_initializer(model, _qdq(model, "QuantizeLinear", False).input[2], value)


def _weight_axis(model) -> None:
    node = _qdq(model, "DequantizeLinear", True)
    axis = next(a for a in node.attribute if a.name == "axis") if any(a.name == "axis" for a in node.attribute) else None
    if axis is None:
        node.attribute.append(onnx.helper.make_attribute("axis", 1))
    else:
        axis.i = 1


def _per_channel_activation(model) -> None:
    node = _qdq(model, "QuantizeLinear", False)
    scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))
    _set_initializer(model, node.input[1], np.full(3, float(scale), np.float32))


CONSTRAINT_CASES = {
    "activation zero point 5": (_activation_zero_point(np.array(5, np.int8)), "zero point 5"),
    "uint8 activations": (_activation_zero_point(np.array(0, np.uint8)), "uint8"),
    "weights quantised along their input channels": (_weight_axis, "per-channel axis 1"),
    "per-channel activation scales": (_per_channel_activation, "per-channel scales on an activation"),
}


def test_tensorrt_int8_constraints_checked_before_judging(int8_bundle, tmp_path, cli_runner, fault_trials):
    trials = fault_trials("artefact_constraints")
    with trials.trial():  # what export writes fits (and the gate passes on it)
        result = cli_runner("bench", int8_bundle, *FAST_BENCH)
        assert result.exit_code == 0, result.output
    for name, (edit, fragment) in CONSTRAINT_CASES.items():
        with trials.trial():
            copy = Path(shutil.copytree(int8_bundle, tmp_path / name.replace(" ", "_")))
            _edit_int8_trt(copy, edit)
            line = one_line_error(cli_runner("bench", copy, *FAST_BENCH))
            assert "TensorRT's Q/DQ constraints" in line and fragment in line and "int8_trt" in line, f"{name}: {line}"
