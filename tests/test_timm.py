"""timm models by name: random init, local weight files, pretrained tags from the Hugging Face cache (offline), ONNX.

No network: pretrained weights are planted in a temporary Hugging Face cache with HF_HUB_OFFLINE on, the way
a machine that was online once keeps them.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kdtool.data import DataInfo, normalize
from kdtool.errors import KdtoolError
from kdtool.models import build_model, check_model_name
from kdtool.preprocess import Normalization, with_normalization

timm = pytest.importorskip("timm")
hub_constants = pytest.importorskip("huggingface_hub.constants")

TINY = "timm:test_resnet.r160_in1k"  # timm's own test model: 0.4 M parameters, mean/std 0.5


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache with the hub offline; returns a function that plants a model's weights."""
    cache = tmp_path / "hf"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # read at import; patch where it is read
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def plant(repo_id: str, state: dict) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))

    return plant


def _equal_states(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items() if not k.startswith(skip))


@pytest.mark.parametrize("name", ["timm:mobilenetv3_large_100", "timm:test_convnext", TINY])
def test_timm_models_build_with_the_dataset_classes(name):
    model = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fixed_size_models_take_the_data_size():
    model = build_model("timm:vit_tiny_patch16_224", 10, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(AssertionError):  # what the image size spares the user
        build_model("timm:vit_tiny_patch16_224", 10)(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["timm:convnext_tiny", "timm:resnet50.a1_in1k", "timm:mobilenetv3_large_100"])
def test_the_issue_names_resolve(name):
    check_model_name(name)


def test_unknown_names_say_what_was_meant():
    with pytest.raises(KdtoolError, match=r"unknown timm model 'convnext_tinny' \(did you mean 'convnext_tiny'\?\)"):
        build_model("timm:convnext_tinny", 10)
    with pytest.raises(KdtoolError, match=r"no pretrained tag 'a1_in1kk' \(did you mean 'resnet50.a1_in1k'\?\)"):
        check_model_name("timm:resnet50.a1_in1kk")
    with pytest.raises(KdtoolError, match="timm has it: use timm:convnext_tiny"):
        build_model("convnext_tiny", 10)
    with pytest.raises(KdtoolError, match="conflict with the tag"):
        build_model("timm:resnet50.a1_in1k", 10, "a2_in1k")


def test_without_timm_the_name_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(KdtoolError, match=r"pip install 'kdtool\[timm\]'"):
        build_model(TINY, 10)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_file_roundtrip(tmp_path, suffix):
    source = build_model(TINY, 10)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # timm's training checkpoints nest it
    loaded = build_model(TINY, 10, str(path))
    assert _equal_states(source, loaded)
    with pytest.raises(KdtoolError, match=r"does not fit the model: shape mismatch at fc.weight"):
        build_model(TINY, 7, str(path))
    with pytest.raises(KdtoolError, match="does not fit the model"):
        build_model("timm:test_convnext", 10, str(path))


def test_pretrained_tag_from_the_hf_cache_offline(hf_cache):
    reference = timm.create_model("test_resnet.r160_in1k", num_classes=1000)
    hf_cache("timm/test_resnet.r160_in1k", reference.state_dict())
    for weights in ("pretrained", "r160_in1k"):
        assert _equal_states(reference, build_model("timm:test_resnet", 1000, weights))
    with pytest.raises(KdtoolError, match="predict 1000 classes, the dataset has 10"):
        build_model(TINY, 10, "pretrained")  # a teacher needs its own head
    student = build_model(TINY, 10, "pretrained", new_head=True)  # a student starts from the features
    assert student.fc.out_features == 10 and _equal_states(student, reference, skip="fc.")


def test_pretrained_not_cached_offline_is_one_line_with_what_to_do(hf_cache):
    with pytest.raises(KdtoolError) as error:
        build_model(TINY, 1000, "pretrained")
    message = str(error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download timm/test_resnet.r160_in1k" in message and "local .safetensors" in message


def test_a_local_copy_of_pretrained_weights_gives_a_student_a_fresh_classifier(tmp_path):
    reference = timm.create_model("test_resnet.r160_in1k", num_classes=1000)
    path = tmp_path / "test_resnet-1000.safetensors"
    save_file(reference.state_dict(), str(path))
    student = build_model(TINY, 10, str(path), new_head=True)
    assert student.get_classifier().out_features == 10 and _equal_states(student, reference, skip="fc.")
    with pytest.raises(KdtoolError, match="does not fit the model"):
        build_model(TINY, 10, str(path))  # a teacher must predict the dataset's classes


@pytest.mark.parametrize("name", ["timm:../x", "timm:", "timm:resnet18/../../x", "timm:resnet18.a1_in1k.x", "timm: resnet18"])
def test_a_name_that_is_not_a_timm_name_says_so(name):
    with pytest.raises(KdtoolError, match=r"is not a timm model name: use timm:<architecture>\[\.<tag>\]"):
        check_model_name(name)


def test_a_failed_download_is_one_line_without_the_hub_retry_warnings(monkeypatch, tmp_path):
    """Online but unreachable: huggingface_hub retries with a warning each time; kdtool says it once."""
    import logging

    http = pytest.importorskip("huggingface_hub.utils._http")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    # Nothing listens on port 9 here: every request is refused at once (huggingface_hub 1.x/2.x read the template).
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # its backoff between retries
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)
    try:
        with pytest.raises(KdtoolError, match="download failed") as error:
            build_model(TINY, 10, "pretrained", new_head=True)
    finally:
        hub_logger.removeHandler(handler)
    assert "\n" not in str(error.value)
    assert not [w for w in warnings if "Retrying" in w or "thrown while requesting" in w], warnings[:3]


def test_timm_student_exports_to_onnx_and_verifies(tmp_path):
    """The exporter's own export and verification, at the recipe's default tolerances and batch sizes."""
    from kdtool.export.onnx_export import export_onnx, ort_session, torch_logits, verify_logits
    from kdtool.recipe import ExportConfig

    cfg = ExportConfig()
    model = build_model("timm:test_efficientnet", 10).eval()
    images = np.random.default_rng(0).standard_normal((9, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "student.onnx"
    export_onnx(model, path, image_size=32, opset=cfg.opset)
    figures = verify_logits("timm student", ort_session(path), images, torch_logits(model, images),
                            batch_sizes=cfg.verify_batch_sizes, max_abs_diff=cfg.max_abs_diff,
                            min_cosine=cfg.min_cosine, min_top1_agreement=cfg.min_top1_agreement)
    assert set(figures["batch_sizes"]) == {str(b) for b in cfg.verify_batch_sizes}  # CheckFailed on a miss


def _teacher_saw_its_own_normalisation(run_dir, bundle_dir, manifest):
    """The bundle's teacher logits (the teacher as distillation ran it, on the student-normalised batch) equal
    the teacher run on its own (0.5, 0.5) normalisation; the student's normalisation is the dataset's."""
    preprocessing = manifest["preprocessing"]
    assert preprocessing["normalization"] == "dataset" and preprocessing["mean"] != [0.5, 0.5, 0.5]
    student_info = DataInfo(10, tuple("0123456789"), preprocessing["image_size"], tuple(preprocessing["mean"]),
                            tuple(preprocessing["std"]))
    teacher = build_model("timm:test_resnet", 10, str(run_dir / "teacher" / "best")).eval()
    images = torch.from_numpy(np.load(bundle_dir / manifest["reference"]["images"]["file"]))[:32]
    own = with_normalization(student_info, Normalization((0.5,) * 3, (0.5,) * 3, "recipe"))
    with torch.no_grad():
        on_own_inputs = teacher(normalize(images, own)).numpy()
        on_student_inputs = teacher(normalize(images, student_info)).numpy()
    saved = np.load(bundle_dir / manifest["reference"]["teacher_logits"]["file"])[:32]
    np.testing.assert_allclose(saved, on_own_inputs, rtol=1e-4, atol=1e-4)
    assert np.abs(saved - on_student_inputs).max() > 1e-2  # control: unmapped, the teacher would see other inputs


def test_timm_teacher_and_torchvision_student_distil_export_and_bench(cli_runner, tmp_path):
    """The issue's done-criterion on digits: a random-init timm teacher (trained in the run, with its own
    normalisation from the recipe) and a torchvision student, through distill, export and bench."""
    from conftest import QUICKSTART, TINY

    # FP16 is off: its fixed tolerance is not what this checks, and a barely trained mobilenet can miss it.
    # The timm teacher gets 2 epochs at lr 0.02: at the quickstart's 0.1 one epoch leaves it at chance with logits
    # in the thousands, the student diverges on them, and export's absolute 1e-3 check fails on 1e8 logits.
    overrides = [*TINY, "teacher.name=timm:test_resnet", "student.name=mobilenet_v3_small", "export.fp16=false",
                 "teacher.train.epochs=2", "teacher.train.optimizer.lr=0.02",
                 "teacher.normalization={mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    distilled = cli_runner("distill", QUICKSTART, *sets, "--out", tmp_path / "run")
    assert distilled.exit_code == 0, distilled.output[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["teacher"]["val_top1"] > 30  # it learned
    exported = cli_runner("export", tmp_path / "run", "--out", tmp_path / "bundle")
    assert exported.exit_code == 0, exported.output[-2000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"] == {"name": "mobilenet_v3_small", "num_classes": 10, "teacher": "timm:test_resnet"}
    _teacher_saw_its_own_normalisation(tmp_path / "run", tmp_path / "bundle", manifest)
    benched = cli_runner("bench", tmp_path / "bundle", "--iters", "1", "--batch", "1", "--no-progress")
    assert benched.exit_code == 0, benched.output[-2000:]
    assert json.loads((tmp_path / "bundle" / "report.json").read_text())["accuracy"][0]["artefact"] == "teacher"
