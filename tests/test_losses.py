"""vanilla / kd / ccd against hand-written formulas, on tiny logits in the joint batch layout."""
from __future__ import annotations

import math

import pytest
import torch

from kdtool.losses import build_loss, ccd, ccd_weights, kd, vanilla
from kdtool.recipe import MethodConfig

T, ALPHA, KD_WEIGHT = 2.0, 0.5, 2.0


def _softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(teacher_row, student_row, temperature):
    p, q = _softmax(teacher_row, temperature), _softmax(student_row, temperature)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _ce(row, label):
    return -math.log(_softmax(row, 1.0)[label])


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# B = 2 originals, C = 3 classes, one view: rows [orig 0, orig 1, view of 0, view of 1].
STUDENT = [[1.0, 0.5, -0.5], [0.2, 0.1, 0.9], [0.8, -0.2, 0.1], [-0.3, 0.4, 0.6]]
TEACHER = [[2.0, 0.0, -1.0], [0.5, -0.5, 1.5], [1.0, 1.0, -2.0], [-1.0, 0.5, 0.0]]
TARGETS = [0, 2]


def _tensors():
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)


def test_ccd_matches_the_formula_on_a_hand_example():
    b = len(TARGETS)
    labels = TARGETS * 2
    ce = sum(_ce(STUDENT[i], labels[i]) for i in range(2 * b)) / (2 * b)
    kl_orig = sum(_kl(TEACHER[i], STUDENT[i], T) for i in range(b)) / b
    kl_aug = sum((1 + _cos(TEACHER[i], TEACHER[b + i])) * _kl(TEACHER[b + i], STUDENT[b + i], T)
                 for i in range(b)) / b
    expected = KD_WEIGHT * (ALPHA * ce + (1 - ALPHA) * T**2 * (kl_orig + kl_aug) / 2)
    parts = ccd(*_tensors(), views=1, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kl_orig"].item() == pytest.approx(kl_orig, rel=1e-5)
    assert parts["kl_aug"].item() == pytest.approx(kl_aug, rel=1e-5)


def test_ccd_weight_is_one_plus_cosine_in_0_2():
    originals = torch.tensor([[1.0, 2.0, 3.0], [1.0, -2.0, 0.5], [0.3, 0.1, -4.0]])
    views = torch.stack([originals[0], -originals[1], torch.tensor([4.0, -0.2, 1.0])])
    weights = ccd_weights(torch.cat([originals, views]), views=1)
    assert weights[0].item() == pytest.approx(2.0)  # identical logits
    assert weights[1].item() == pytest.approx(0.0, abs=1e-6)  # opposite logits
    assert weights[2].item() == pytest.approx(1 + _cos(originals[2].tolist(), views[2].tolist()), rel=1e-5)
    random_weights = ccd_weights(torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), views=1)
    assert random_weights.min() >= 0 and random_weights.max() <= 2


def test_ccd_with_identical_teacher_views_is_kd_with_the_views_weighted_2():
    """t_a == t_o gives w = 2: L = kd_weight*(alpha*CE + (1-alpha)*T^2*(KL_orig + 2*KL_aug)/2)."""
    student, teacher, targets = _tensors()
    teacher = torch.cat([teacher[:2], teacher[:2]])
    parts = ccd(student, teacher, targets, views=1, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT)
    kl_orig = sum(_kl(TEACHER[i], STUDENT[i], T) for i in range(2)) / 2
    kl_aug = sum(_kl(TEACHER[i], STUDENT[2 + i], T) for i in range(2)) / 2
    ce = sum(_ce(STUDENT[i], (TARGETS * 2)[i]) for i in range(4)) / 4
    expected = KD_WEIGHT * (ALPHA * ce + (1 - ALPHA) * T**2 * (kl_orig + 2 * kl_aug) / 2)
    assert parts["weight_mean"].item() == pytest.approx(2.0)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", [kd, ccd])
def test_gradients_reach_the_student_only(method):
    """The teacher is frozen: its logits (and CCD's weights) are constants of the loss."""
    student, teacher, targets = _tensors()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = method(student, teacher, targets, views=1, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT)["loss"]
    (student_grad,) = torch.autograd.grad(loss, [student], retain_graph=True)
    assert student_grad.abs().sum() > 0
    # What the trainer actually gets: teacher logits computed under no_grad carry no graph.
    with torch.no_grad():
        frozen_teacher = teacher * 1
    loss = method(student, frozen_teacher, targets, views=1, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT)["loss"]
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_ccd_weights_are_detached_from_the_teacher():
    teacher = torch.tensor(TEACHER, requires_grad=True)
    parts = ccd(torch.tensor(STUDENT), teacher, torch.tensor(TARGETS), views=1, temperature=T,
                alpha=ALPHA, kd_weight=KD_WEIGHT)
    assert not parts["weight_mean"].requires_grad


def test_vanilla_ignores_the_teacher():
    student, teacher, targets = _tensors()
    with_teacher = vanilla(student, teacher, targets, views=1)["loss"]
    without = vanilla(student, None, targets, views=1)["loss"]
    expected = sum(_ce(STUDENT[i], (TARGETS * 2)[i]) for i in range(4)) / 4
    assert with_teacher.item() == without.item() == pytest.approx(expected, rel=1e-5)


def test_kd_matches_the_formula_over_all_samples():
    ce = sum(_ce(STUDENT[i], (TARGETS * 2)[i]) for i in range(4)) / 4
    kl = sum(_kl(TEACHER[i], STUDENT[i], T) for i in range(4)) / 4
    parts = kd(*_tensors(), views=1, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT)
    assert parts["loss"].item() == pytest.approx(KD_WEIGHT * (ALPHA * ce + (1 - ALPHA) * T**2 * kl), rel=1e-5)


def test_two_views_layout():
    """Rows [orig (B); view 1 (B); view 2 (B)]: view v of original i is row v*B + i."""
    g = torch.Generator().manual_seed(1)
    b, c = 2, 3
    student, teacher = torch.randn(3 * b, c, generator=g), torch.randn(3 * b, c, generator=g)
    targets = torch.tensor([1, 0])
    parts = ccd(student, teacher, targets, views=2, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT)
    s, t = student.tolist(), teacher.tolist()
    labels = targets.tolist() * 3
    kl_orig = sum(_kl(t[i], s[i], T) for i in range(b)) / b
    kl_aug = sum((1 + _cos(t[i], t[v * b + i])) * _kl(t[v * b + i], s[v * b + i], T)
                 for v in (1, 2) for i in range(b)) / (2 * b)
    ce = sum(_ce(s[i], labels[i]) for i in range(3 * b)) / (3 * b)
    expected = KD_WEIGHT * (ALPHA * ce + (1 - ALPHA) * T**2 * (kl_orig + kl_aug) / 2)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_build_loss_by_name():
    loss_fn, needs_teacher = build_loss(MethodConfig(name="kd", temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT))
    assert needs_teacher
    assert loss_fn(*_tensors(), 1)["loss"].item() == pytest.approx(
        kd(*_tensors(), views=1, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT)["loss"].item())
    assert build_loss(MethodConfig(name="vanilla"))[1] is False
