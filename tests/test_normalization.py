"""Per-model normalisation: which mean/std each model gets and why, and the teacher's on-device re-normalisation."""
from __future__ import annotations

import pytest
import torch

from kdtool.data import DataInfo, normalize
from kdtool.models import build_model
from kdtool.preprocess import (
    Normalization, Renormalize, describe_normalization, normalization_plan, teacher_on_student_inputs, with_normalization,
)
from kdtool.recipe import load_recipe
from tests.conftest import QUICKSTART

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Dataset statistics unlike any pretrained model's, so that a model given the dataset's is told apart.
INFO = DataInfo(10, tuple("0123456789"), 16, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1))


def _recipe(*overrides: str):
    return load_recipe(QUICKSTART, list(overrides))


def test_random_init_models_get_the_dataset_normalisation():
    plan = normalization_plan(_recipe(), INFO)
    assert plan.student.why == plan.teacher.why == "dataset"
    assert (plan.student.mean, plan.student.std) == (INFO.mean, INFO.std)


def test_pretrained_weights_bring_their_own():
    """Metadata only: nothing is downloaded to plan."""
    pytest.importorskip("timm")
    plan = normalization_plan(_recipe("student.name=resnet18", "student.weights=IMAGENET1K_V1",
                                      "teacher.name=timm:test_resnet.r160_in1k", "teacher.weights=pretrained"), INFO)
    assert (plan.student.mean, plan.student.std) == IMAGENET
    assert plan.student.why == "torchvision weights IMAGENET1K_V1" and plan.student.pretrained_size == 224
    assert (plan.teacher.mean, plan.teacher.std) == ((0.5,) * 3, (0.5,) * 3)
    assert plan.teacher.why == "timm pretrained_cfg test_resnet.r160_in1k"


def test_the_recipe_wins(tmp_path):
    pinned = "{mean: [0.4, 0.4, 0.4], std: [0.2, 0.2, 0.2]}"
    plan = normalization_plan(_recipe("student.name=resnet18", "student.weights=IMAGENET1K_V1",
                                      "student.normalization=dataset", f"teacher.normalization={pinned}"), INFO)
    assert plan.student.why == "dataset" and plan.student.mean == INFO.mean
    assert plan.teacher.why == "recipe" and plan.teacher.mean == (0.4,) * 3 and plan.teacher.std == (0.2,) * 3
    local = normalization_plan(_recipe(f"student.weights={tmp_path / 'any.safetensors'}"), INFO)
    assert local.student.why == "dataset"  # a local file says nothing about how it was trained


def test_recipe_check_lines_say_which_and_why():
    recipe = _recipe("student.name=resnet18", "student.weights=IMAGENET1K_V1", "data.image_size=32")
    student, teacher = describe_normalization(recipe, INFO)
    assert student.startswith("student resnet18: mean [0.485, 0.456, 0.406]")
    assert "torchvision weights IMAGENET1K_V1; weights trained at 224 px, bilinear; data is 32 px" in student
    assert teacher.startswith("teacher resnet14: mean [0.1, 0.2, 0.3] std [0.3, 0.2, 0.1] (dataset)")
    assert "trained in the run" in teacher
    assert "the dataset's mean/std" in describe_normalization(recipe, None)[1]


def test_teacher_logits_equal_the_teacher_on_its_own_preprocessing():
    """From the same uint8 images: the wrapped teacher on the student's batch == the teacher on its own inputs."""
    pytest.importorskip("timm")
    recipe = _recipe("student.name=resnet8", "teacher.name=timm:test_resnet.r160_in1k", "teacher.weights=pretrained")
    plan = normalization_plan(recipe, INFO)
    assert not plan.teacher.same_values(plan.student)
    teacher = build_model(recipe.teacher.name, INFO.num_classes).eval()  # random init: the plan needs no download
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    student_batch = normalize(images, with_normalization(INFO, plan.student))
    wrapped = teacher_on_student_inputs(teacher, plan)
    with torch.no_grad():
        own = teacher(normalize(images, with_normalization(INFO, plan.teacher)))
        mapped = wrapped(student_batch)
        unmapped = teacher(student_batch)
    assert isinstance(wrapped, Renormalize)
    torch.testing.assert_close(mapped, own, rtol=1e-5, atol=1e-5)
    assert (unmapped - own).abs().max() > 1e-2  # without the map the teacher would see other inputs


def test_the_wrapper_is_transparent_where_it_should_be():
    plan = normalization_plan(_recipe(), INFO)
    teacher = build_model("resnet8", 10)
    assert teacher_on_student_inputs(teacher, plan) is teacher  # same normalisation: no wrapper, no cost
    mapped = Renormalize(teacher, plan.student, Normalization((0.5,) * 3, (0.5,) * 3, "recipe"))
    assert set(mapped.state_dict()) == {f"model.{k}" for k in teacher.state_dict()}  # no extra saved tensors
    mapped = mapped.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        batch = torch.rand(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        assert mapped(batch).shape == (2, 10)
