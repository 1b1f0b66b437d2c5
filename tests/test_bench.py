"""kdtool bench: statistics, the report files, the accuracy gate, bad bundles, and a bundle benched with
only the bundle (its run deleted).

One tiny bundle is built once per module with `kdtool export` on a one-epoch quickstart run at 8x8 (the
digits' native size). Whatever runtimes this machine has run; the tests do not assume a GPU is absent.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from onnx import numpy_helper

from kdtool.bench import RUNTIMES, find_latest_bundle, latency_stats, measure
from kdtool.bench.run import resolve_settings
from kdtool.bundle import bundle_lock, read_manifest, write_manifest
from kdtool.cli import cli
from kdtool.errors import KdtoolError
from kdtool.io import sha256_file
from kdtool.recipe import BenchConfig

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["train.epochs=1", "teacher.train.epochs=1", "data.image_size=8", "teacher.name=resnet8",
            "data.batch_size=32", "train.schedule.warmup_epochs=0", "teacher.train.schedule.warmup_epochs=0",
            # A one-epoch 8x8 student loses up to ~2 points to INT8; the damaged model below loses ~70.
            "bench.gate.max_top1_drop={fp32: 0.5, fp16: 0.5, int8: 5.0}",
            "export.int8.calibration_images=64", "export.int8.max_top1_drop=5"]
FAST_BENCH = ["--batch", "1", "--batch", "8", "--iters", "3", "--threads", "1", "--no-progress"]


# ---------------------------------------------------------------- the bundle (what kdtool export writes)
def make_run(root: Path) -> Path:
    from kdtool.recipe import load_recipe
    from kdtool.train import distill

    run_dir = root / "runs" / "tiny"
    distill(load_recipe(REPO / "recipes" / "quickstart.yaml", TINY_RUN), run_dir, progress=False)
    return run_dir


def make_bundle(root: Path) -> Path:
    from kdtool.export import export_bundle

    return export_bundle(make_run(root), out=root / "export" / "tiny", progress=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bench"))


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    """A private copy of the bundle that a test may damage."""
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


def _bench(*args) -> Result:
    return CliRunner().invoke(cli, ["bench", *map(str, args), *FAST_BENCH])


def replace_artefact(bundle_dir: Path, key: str, write) -> None:
    """Replace an artefact and update its manifest entry, as a faulty export would write it."""
    manifest = read_manifest(bundle_dir)
    path = bundle_dir / manifest.artefacts[key].file
    write(path)
    data = manifest.model_dump(mode="json")
    data["artefacts"][key].update(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    write_manifest(bundle_dir, type(manifest).model_validate_json(json.dumps(data)))


# ---------------------------------------------------------------- statistics and the harness
def test_latency_stats_on_known_timings():
    durations_ns = [ms * 1_000_000 for ms in range(100, 0, -1)]  # 1..100 ms, in reverse order
    stats = latency_stats(durations_ns, batch_size=4)
    assert stats["iterations"] == 100
    assert stats["latency_ms"] == pytest.approx({"min": 1.0, "mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert stats["throughput_ips"] == pytest.approx(4 * 1000 / 50.5)


def test_latency_stats_single_timing():
    stats = latency_stats([2_500_000], batch_size=1)
    assert stats["latency_ms"] == pytest.approx({"min": 2.5, "mean": 2.5, "p50": 2.5, "p90": 2.5, "p99": 2.5})
    assert stats["throughput_ips"] == pytest.approx(400.0)


def test_measure_cycles_inputs_after_warmup():
    seen = []
    durations = measure(seen.append, ["a", "b", "c"], warmup=2, iters=5)
    assert len(durations) == 5 and all(d >= 0 for d in durations)
    assert seen == ["a", "b", "a", "b", "c", "a", "b"]
    assert len(measure(seen.append, ["a"], warmup=0, duration=0.01)) >= 1


def test_settings_precedence():
    bench = BenchConfig(batch_sizes=[8, 1], iters=50, duration=None, threads=3)
    settings = resolve_settings(bench)
    assert (settings.batch_sizes, settings.iters, settings.duration, settings.threads) == ((1, 8), 50, None, 3)
    assert resolve_settings(bench, duration=2.0).iters is None
    timed = resolve_settings(BenchConfig(duration=5.0))
    assert (timed.iters, timed.duration) == (None, 5.0)
    assert (resolve_settings(BenchConfig(duration=5.0), iters=7).iters, resolve_settings(bench, threads=1).threads) == (7, 1)
    assert resolve_settings(bench, include_copies=False).include_copies is False
    with pytest.raises(KdtoolError, match="not both"):
        resolve_settings(bench, iters=3, duration=1.0)


# ---------------------------------------------------------------- end to end
def test_good_bundle_passes_and_writes_report(bundle):
    result = _bench(bundle)
    assert result.exit_code == 0, result.output
    assert "gate passed for fp16, fp32, int8, int8_trt" in " ".join(result.output.split())

    report = json.loads((bundle / "report.json").read_text())
    assert report["gate"]["passed"] and report["host"] and report["timestamp"]
    assert report["gate"]["checked"] == ["fp16", "fp32", "int8", "int8_trt"] and not report["failed"]
    assert report["settings"]["data"] == {"source": "reference", "images": 360, "description": report["settings"]["data"]["description"]}
    assert report["environment"]["cpu"]["logical_cores"] >= 1
    assert report["environment"]["versions"]["onnxruntime"]
    cases = {(c["artefact"], c["runtime"], c["batch_size"]) for c in report["timing"]}
    assert {(a, "ort-cpu", b) for a in ("fp32", "int8", "fp16") for b in (1, 8)} <= cases
    assert not any(c["runtime"] in ("ort-emulated", "ort-cpu") and c["artefact"] == "int8_trt" for c in report["timing"])
    assert all(c["iterations"] == 3 and c["threads"] == 1 for c in report["timing"])
    rows = {(row["artefact"], row["runtime"]): row for row in report["accuracy"]}
    assert {("teacher", "pytorch@export"), ("student", "pytorch@export"), ("fp32", "ort-cpu"), ("int8", "ort-cpu"),
            ("fp16", "ort-cpu"), ("int8_trt", "ort-emulated")} <= set(rows)
    assert ("int8_trt", "ort-cpu") not in rows  # not judged on CPU integer kernels it was not made for
    assert rows["fp32", "ort-cpu"]["student_agreement"] == pytest.approx(100.0)
    assert rows["fp32", "ort-cpu"]["top1_drop"] == pytest.approx(0.0)
    assert rows["student", "pytorch@export"]["top1"] > 50  # a trained student, so the gate test below means something

    markdown = (bundle / "report.md").read_text()
    for heading in ("## Timing", "## Accuracy", "## Gate", "## Runtimes"):
        assert heading in markdown
    assert "| fp32 | fp32 | ort-cpu | CPUExecutionProvider | 1 |" in markdown
    assert all(c["ran_on"] == "CPUExecutionProvider" for c in report["timing"] if c["runtime"] == "ort-cpu")
    assert (bundle / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_runtimes_are_listed_with_reasons(bundle):
    """Whatever this machine has: an unavailable runtime is skipped with its reason for each artefact it serves,
    an available one is never skipped for being unavailable, and nothing it serves is left unchecked."""
    if not (bundle / "report.json").exists():
        assert _bench(bundle).exit_code == 0
    report = json.loads((bundle / "report.json").read_text())
    runtimes = {r["name"]: r for r in report["runtimes"]}
    assert set(runtimes) == set(RUNTIMES)
    skipped = {(s["artefact"], s["runtime"]): s["reason"] for s in report["skipped"] if "batch_size" not in s}
    served = {(key, name) for name, runtime in RUNTIMES.items() for key in ("fp32", "int8", "int8_trt", "fp16")
              if "onnx" in runtime.formats and read_manifest(bundle).artefacts[key].target in runtime.targets}
    for key, name in served:
        runtime = runtimes[name]
        assert runtime["available"] == (runtime["reason"] is None)
        if runtime["available"]:
            assert (key, name) not in skipped or skipped[key, name].startswith("export found")
        else:
            assert skipped[key, name] == runtime["reason"]
    assert runtimes["ort-cpu"]["available"] and runtimes["ort-emulated"]["available"]


def test_bundle_benches_without_its_run(tmp_path):
    """Copy a bundle elsewhere, delete the run it came from: bench checks every artefact from the bundle alone."""
    root = tmp_path / "training-machine"
    bundle = make_bundle(root)
    served = Path(shutil.copytree(bundle, tmp_path / "serving-machine" / "bundle"))
    shutil.rmtree(root)
    result = _bench(served)
    assert result.exit_code == 0, result.output
    report = json.loads((served / "report.json").read_text())
    assert report["gate"]["passed"] and set(report["gate"]["checked"]) == {"fp32", "int8", "int8_trt", "fp16"}
    assert report["settings"]["data"]["source"] == "reference"
    result = _bench(served, "--data", tmp_path)  # the digits are embedded: a DIR would not be read
    assert result.exit_code == 2 and "takes no root" in result.output, result.output


def test_rebuild_from_the_bundle_alone(tmp_path):
    """`kdtool export --trt --rebuild BUNDLE` on a copied bundle whose run is gone."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: no engine can be rebuilt here")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs an NVIDIA GPU with CUDA")
    root = tmp_path / "training-machine"
    bundle = make_bundle(root)
    served = Path(shutil.copytree(bundle, tmp_path / "serving-machine" / "bundle"))
    shutil.rmtree(root)
    result = CliRunner().invoke(cli, ["export", "--trt", "--rebuild", str(served), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert {"trt_fp16", "trt_int8"} <= set(read_manifest(served).artefacts)
    result = _bench(served)
    assert result.exit_code == 0, result.output
    assert {"trt_fp16", "trt_int8"} <= set(json.loads((served / "report.json").read_text())["gate"]["checked"])


def _zero_int8_weights(model_path: Path) -> None:
    model = onnx.load(str(model_path))
    damaged = 0
    for initializer in model.graph.initializer:
        if initializer.data_type == onnx.TensorProto.INT8:
            initializer.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(initializer)), initializer.name))
            damaged += 1
    assert damaged > 0
    onnx.save(model, str(model_path))


def test_damaged_int8_fails_the_gate(bundle_copy):
    replace_artefact(bundle_copy, "int8", _zero_int8_weights)
    result = _bench(bundle_copy)
    assert result.exit_code == 1, result.output
    assert "accuracy gate failed" in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("int8")]
    assert failed and "ort-cpu" in failed[0] and "top1_drop" in failed[0]
    assert not any(line.startswith("fp32 ") for line in result.output.splitlines())
    report = json.loads((bundle_copy / "report.json").read_text())  # written before failing
    assert not report["gate"]["passed"]
    assert {(f["artefact"], f["metric"]) for f in report["gate"]["failures"]} >= {("int8", "top1_drop")}


# ---------------------------------------------------------------- bad input: exit 2, one line naming the file
def test_missing_artefact_exits_2(bundle_copy):
    (bundle_copy / "model.int8.onnx").unlink()
    result = _bench(bundle_copy)
    assert result.exit_code == 2
    assert "model.int8.onnx" in result.output and "'int8'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("content", ["{not json", "[]", '{"input": {}}'])
def test_corrupt_manifest_exits_2(bundle_copy, content):
    (bundle_copy / "manifest.json").write_text(content)
    result = _bench(bundle_copy)
    assert result.exit_code == 2
    assert "manifest.json" in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_bundle_or_manifest_exits_2(tmp_path):
    result = _bench(tmp_path / "nowhere")
    assert result.exit_code == 2 and "nowhere" in result.output
    result = _bench(tmp_path)
    assert result.exit_code == 2 and "manifest.json" in result.output


def test_an_artefact_that_cannot_run_fails_instead_of_being_skipped(bundle_copy):
    replace_artefact(bundle_copy, "fp16", lambda path: path.write_bytes(b"not an onnx model"))
    result = _bench(bundle_copy)
    assert result.exit_code == 1, result.output
    assert "could not run" in result.output and "gate passed" not in result.output
    report = json.loads((bundle_copy / "report.json").read_text())
    assert report["gate"]["passed"] is False and {f["artefact"] for f in report["failed"]} == {"fp16"}


def test_input_shape_differing_from_the_manifest_exits_2(bundle_copy, tmp_path):
    from kdtool.export import export_onnx

    other = tmp_path / "other.onnx"
    export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)), other, image_size=16, opset=17)
    replace_artefact(bundle_copy, "fp32", lambda path: shutil.copy(other, path))
    result = _bench(bundle_copy)
    assert result.exit_code == 2, result.output
    assert "input shape" in result.output and "differs from the manifest" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bundle_in_use_is_refused(bundle_copy):
    with bundle_lock(bundle_copy):
        result = _bench(bundle_copy)
    assert result.exit_code == 2 and "in use by another kdtool process" in result.output, result.output


def _fake_bundle(path: Path, mtime: int) -> None:
    path.mkdir()
    (path / "manifest.json").write_text('{"format": {"name": "kdtool-bundle", "version": 3}}')
    os.utime(path / "manifest.json", (mtime, mtime))


def test_find_latest_bundle(tmp_path):
    with pytest.raises(KdtoolError, match="no bundle"):
        find_latest_bundle(tmp_path)
    for name, mtime in (("old", 1_000), ("new", 2_000), ("also_old", 1_500)):
        _fake_bundle(tmp_path / name, mtime)
    (tmp_path / "not_a_bundle").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text("{}")
    for leftover in (".new.abcd1234.partial", ".new.abcd1234.old"):
        _fake_bundle(tmp_path / leftover, 3_000)  # newer, but a killed write's leftover
    (tmp_path / "link").symlink_to(tmp_path / ".new.abcd1234.partial")
    assert find_latest_bundle(tmp_path) == tmp_path / "new"


# ---------------------------------------------------------------- runtimes that cannot lie
def test_the_readme_shows_the_artefact_table():
    """export/README.md's artefact table is the one kdtool.bundle.artefacts and the runtime registry make."""
    from kdtool.bench import artefact_table

    assert artefact_table() in (REPO / "export" / "README.md").read_text()


def _ort_runtime(name: str, provider: str, on_gpu: bool):
    from kdtool.bench import Runtime
    from kdtool.bench.ort_runner import open_ort, provider_missing

    return Runtime(name, frozenset({"onnx"}), frozenset({"any", "cpu", "gpu"}), on_gpu, provider_missing(provider),
                   open_ort(provider, on_gpu=on_gpu), ("onnxruntime",))


def test_a_provider_listed_as_available_but_unusable_fails_its_case(bundle_copy):
    """ONNX Runtime lists AzureExecutionProvider as available on every build, yet it runs no Conv: asked for
    alone, ORT quietly places every node on its CPU provider. kdtool's GPU-runtime session refuses CPU fallback,
    so the runtime fails its case (exit 1, report written) instead of giving a CPU result under its name."""
    import onnxruntime as ort

    from kdtool.bench import GateFailed, run_bench
    from kdtool.errors import Registry

    if "AzureExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime build has no AzureExecutionProvider to stand for an unusable provider")
    quiet = ort.InferenceSession(str(bundle_copy / "model.fp32.onnx"), providers=["AzureExecutionProvider"])
    assert quiet.get_providers()[-1] == "CPUExecutionProvider"  # what ORT does without kdtool's switch
    runtimes = Registry("runtime", {"ort-cpu": RUNTIMES["ort-cpu"],
                                    "ort-azure": _ort_runtime("ort-azure", "AzureExecutionProvider", on_gpu=True)})
    with pytest.raises(GateFailed, match="could not run") as failure:
        run_bench(bundle_copy, batch_sizes=[1], iters=1, threads=1, progress=False, runtimes=runtimes)
    report = failure.value.report
    failed = {(f["artefact"], f["runtime"]) for f in report["failed"]}
    assert failed == {(key, "ort-azure") for key in ("fp32", "int8", "fp16")}
    assert all("CPU fallback disabled" in f["reason"] for f in report["failed"])
    assert not any(row["runtime"] == "ort-azure" for row in report["timing"] + report["accuracy"])
    assert report["gate"]["passed"] is False and json.loads((bundle_copy / "report.json").read_text())["failed"]


def test_a_session_that_did_not_get_its_provider_is_refused(bundle):
    """ONNX Runtime only warns and drops a provider it does not have; kdtool checks get_providers()."""
    import onnxruntime as ort

    from kdtool.export.runner import ort_session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(KdtoolError, match="did not give .* the CUDAExecutionProvider it asked for"):
        ort_session(bundle / "model.fp32.onnx", providers=["CUDAExecutionProvider"])
    with pytest.raises(KdtoolError, match="CPU fallback disabled"):
        ort_session(bundle / "model.fp32.onnx", providers=["CUDAExecutionProvider"], cpu_fallback=False)


def test_tensorrt_major_mismatch_is_one_line(tmp_path):
    from kdtool.bench.ort_runner import linked_tensorrt_major, tensorrt_mismatch

    library = tmp_path / "libonnxruntime_providers_tensorrt.so"
    library.write_bytes(b"\x7fELF" + b"\x00" * 64 + b"libcudart.so.12\x00libnvinfer.so.10\x00libnvonnxparser.so.10\x00")
    assert linked_tensorrt_major(library) == 10
    assert linked_tensorrt_major(tmp_path / "absent.so") is None
    line = tensorrt_mismatch(10, "11.1.0", loadable=lambda soname: True)
    assert "needs TensorRT 10 (libnvinfer.so.10), the installed tensorrt is 11.1.0" in line and "\n" not in line
    assert "kdtool[ort-gpu]" in line
    assert tensorrt_mismatch(10, "10.13.3", loadable=lambda soname: False) is None
    assert tensorrt_mismatch(10, None, loadable=lambda soname: soname == "libnvinfer.so.10") is None
    assert "no libnvinfer.so.10 is installed" in tensorrt_mismatch(10, None, loadable=lambda soname: False)


def test_rebuild_starts_from_the_bundles_timing_cache(bundle, tmp_path):
    """`export --trt --rebuild` stages the bundle's timing cache where the engine builds read it."""
    from kdtool.export.stage import copy_for_rebuild

    source = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    (source / "tensorrt.timing.cache").write_bytes(b"timings of an earlier build")
    (source / "model.trt_fp16.engine").write_bytes(b"an engine for another GPU")
    staging = tmp_path / "staging"
    staging.mkdir()
    copy_for_rebuild(source, staging)
    assert (staging / "tensorrt.timing.cache").read_bytes() == b"timings of an earlier build"
    assert not (staging / "model.trt_fp16.engine").exists() and not (staging / "manifest.json").exists()
    (source / "tensorrt.timing.cache").unlink()
    (source / "tensorrt.timing.cache").symlink_to(tmp_path / "elsewhere.cache")
    with pytest.raises(KdtoolError, match="symbolic link"):
        copy_for_rebuild(source, tmp_path / "staging2")


def test_openvino_runs_every_cpu_artefact_beside_onnx_runtime(bundle):
    """OpenVINO's CPU plugin times and checks every ONNX artefact ORT's CPU provider runs; the report names
    the faster runtime per artefact and batch size."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    result = _bench(bundle)
    assert result.exit_code == 0, result.output
    report = json.loads((bundle / "report.json").read_text())
    timed = {(c["artefact"], c["batch_size"]): c for c in report["timing"] if c["runtime"] == "openvino-cpu"}
    assert set(timed) == {(key, size) for key in ("fp32", "int8", "fp16") for size in (1, 8)}
    assert all(c["ran_on"].startswith("OpenVINO") and c["ran_on"].endswith("CPU plugin") for c in timed.values())
    rows = {(row["artefact"], row["runtime"]): row for row in report["accuracy"]}
    assert rows["fp32", "openvino-cpu"]["student_agreement"] > 99 and ("int8_trt", "openvino-cpu") not in rows
    fastest = {(row["artefact"], row["batch_size"]): row for row in report["fastest"]}
    assert set(fastest) == set(timed)
    for (key, size), row in fastest.items():
        p50 = {c["runtime"]: c["latency_ms"]["p50"] for c in report["timing"]
               if (c["artefact"], c["batch_size"]) == (key, size)}
        assert row["fastest"] == min(p50, key=p50.get) and row["speedup"] >= 1
    assert "## Fastest runtime per artefact and batch size" in (bundle / "report.md").read_text()
    assert report["environment"]["versions"]["openvino"]
