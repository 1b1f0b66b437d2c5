"""Model registry and weights loading (local checkpoints and torchvision's weights enum, offline)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kdtool.errors import KdtoolError
from kdtool.models import MODELS, build_model


@pytest.mark.parametrize("name", ["resnet8", "resnet14", "resnet8x4", "resnet32x4", "mobilenet_v2", "resnet18"])
def test_registry_builds_classifiers(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_lists_known():
    with pytest.raises(KdtoolError, match=r"unknown model 'resnet9'.*known: .*mobilenet_v2.*resnet8x4"):
        build_model("resnet9", 10)
    assert "resnet32x4" in MODELS and "mobilenet_v3_small" in MODELS


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_roundtrip(tmp_path, suffix):
    source = build_model("resnet8", 10)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # DDP-style keys
    loaded = build_model("resnet8", 10, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_errors_name_the_culprit(tmp_path):
    with pytest.raises(KdtoolError, match="checkpoint not found: .*missing.safetensors"):
        build_model("resnet8", 10, str(tmp_path / "missing.safetensors"))
    save_file(build_model("resnet14", 10).state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(KdtoolError, match=r"does not fit the model: .*unexpected keys stages\.0\.1"):
        build_model("resnet8", 10, str(tmp_path / "other.safetensors"))
    save_file(build_model("resnet8", 5).state_dict(), str(tmp_path / "five.safetensors"))
    with pytest.raises(KdtoolError, match=r"shape mismatch at fc.weight \(\(5, 64\) vs model \(10, 64\)"):
        build_model("resnet8", 10, str(tmp_path / "five.safetensors"))
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "five.safetensors").read_bytes()[:100])
    with pytest.raises(KdtoolError, match="unreadable or corrupt"):
        build_model("resnet8", 5, str(tmp_path / "trunc.safetensors"))


def test_torchvision_weights_enum_from_the_hub_cache(tmp_path, monkeypatch):
    """The enum path reads torch's hub cache, where a machine that was online keeps the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18(num_classes=1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    model = build_model("resnet18", 1000, "IMAGENET1K_V1")
    assert torch.equal(model.fc.weight, reference.fc.weight)
    with pytest.raises(KdtoolError, match="predict 1000 classes, the dataset has 10"):
        build_model("resnet18", 10, "IMAGENET1K_V1")
    student = build_model("resnet18", 10, "IMAGENET1K_V1", new_head=True)  # pretrained features, fresh classifier
    assert student.fc.out_features == 10 and torch.equal(student.conv1.weight, reference.conv1.weight)


def test_registry_membership_is_a_question_not_an_error():
    from kdtool.models import MODELS

    assert "resnet8" in MODELS and "resnet9000" not in MODELS


def test_a_local_copy_of_pretrained_weights_gives_a_student_a_fresh_classifier(tmp_path):
    """A 1000-class file for a 10-class student: the features load, the classifier starts afresh (as from the
    cache); a teacher, or a file of another architecture, is still refused."""
    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18-1000.safetensors"
    save_file(reference.state_dict(), str(path))
    student = build_model("resnet18", 10, str(path), new_head=True)
    assert student.fc.out_features == 10 and torch.equal(student.conv1.weight, reference.conv1.weight)
    assert torch.equal(student.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    with pytest.raises(KdtoolError, match=r"does not fit the model: shape mismatch at fc.weight"):
        build_model("resnet18", 10, str(path))  # a teacher must predict the dataset's classes
    with pytest.raises(KdtoolError, match="does not fit the model"):
        build_model("resnet34", 10, str(path), new_head=True)
