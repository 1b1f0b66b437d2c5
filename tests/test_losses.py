"""vanilla / kd / ccd / dkd / dist against hand-written formulas, on tiny logits in the joint batch layout."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from kdtool.losses import METHODS, build_loss, ccd, ccd_weights, dist, dkd, kd, per_sample_kl, vanilla
from kdtool.recipe import METHOD_SETTINGS, DKDMethod, MethodConfig

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


DKD_SETTINGS = dict(tckd_weight=1.0, nckd_weight=8.0, warmup_epochs=20.0)
DIST_SETTINGS = dict(inter_weight=1.0, intra_weight=2.0)


@pytest.mark.parametrize("method", [kd, ccd, partial(dkd, epoch=5.0, **DKD_SETTINGS), partial(dist, **DIST_SETTINGS)],
                         ids=["kd", "ccd", "dkd", "dist"])
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


# Golden values for STUDENT / TEACHER / TARGETS (one view: 4 rows, labels [0, 2, 0, 2]) at T = 2,
# computed once in float64 with numpy straight from the papers' definitions (softmax by exp/sum, the
# binary and non-target distributions built by hand, np.corrcoef for Pearson), not from kdtool.
GOLDEN_CE = 0.6731821169923684
GOLDEN_TCKD = 0.08862387966876484  # T^2 * mean_i KL([p_t, 1 - p_t] teacher || student)
GOLDEN_NCKD = 0.31121364737434015  # T^2 * mean_i KL(non-target softmax teacher || student)
GOLDEN_DKD = 1.31776538165824  # 2 * (0.5 * CE + 0.5 * (5 / 20) * (1 * TCKD + 8 * NCKD))
GOLDEN_INTER = 1.0854303615907481  # T^2 * (1 - mean over rows of pearson)
GOLDEN_INTRA = 1.6192885937667043  # T^2 * (1 - mean over the 3 class columns of pearson)
GOLDEN_DIST = 4.997189666116525  # 2 * (0.5 * CE + 0.5 * (1 * INTER + 2 * INTRA))


def test_dkd_matches_golden_values():
    parts = dkd(*_tensors(), views=1, epoch=5.0, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT, **DKD_SETTINGS)
    assert parts["ce"].item() == pytest.approx(GOLDEN_CE, rel=1e-5)
    assert parts["tckd"].item() == pytest.approx(GOLDEN_TCKD, rel=1e-5)
    assert parts["nckd"].item() == pytest.approx(GOLDEN_NCKD, rel=1e-5)
    assert parts["warmup"].item() == pytest.approx(0.25)
    assert parts["loss"].item() == pytest.approx(GOLDEN_DKD, rel=1e-5)


def test_dkd_parts_recompose_classical_kd():
    """The paper's Eq. (1): KL = TCKD + (1 - p_t^teacher) * NCKD, per sample (here at T = 3, 10 classes)."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    targets = torch.randint(0, 10, (6,), generator=g)
    temperature = 3.0
    for i in range(6):
        row = slice(i, i + 1)
        parts = dkd(student[row], teacher[row], targets[row], views=0, temperature=temperature, alpha=0.0,
                    kd_weight=1.0, tckd_weight=1.0, nckd_weight=1.0, warmup_epochs=0.0)
        p_target = torch.softmax(teacher[i] / temperature, dim=0)[targets[i]].item()
        kl = per_sample_kl(teacher[row], student[row], temperature).item()
        assert kl * temperature**2 == pytest.approx(parts["tckd"].item() + (1 - p_target) * parts["nckd"].item(), rel=1e-4)


@pytest.mark.parametrize("epoch, ramp", [(0.0, 0.0), (5.0, 0.25), (10.0, 0.5), (20.0, 1.0), (31.5, 1.0)])
def test_dkd_warmup_is_a_linear_ramp_of_the_kd_term(epoch, ramp):
    parts = dkd(*_tensors(), views=1, epoch=epoch, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT, **DKD_SETTINGS)
    expected = KD_WEIGHT * (ALPHA * GOLDEN_CE + (1 - ALPHA) * ramp * (GOLDEN_TCKD + 8 * GOLDEN_NCKD))
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)
    no_warmup = dkd(*_tensors(), views=1, epoch=epoch, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT,
                    **{**DKD_SETTINGS, "warmup_epochs": 0.0})
    assert no_warmup["warmup"].item() == 1.0


def test_dist_matches_golden_values_with_and_without_views():
    """DIST takes the joint batch as one batch: 2 originals + 1 view equal 4 originals with the same labels."""
    student, teacher, targets = _tensors()
    with_views = dist(student, teacher, targets, views=1, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT, **DIST_SETTINGS)
    originals = dist(student, teacher, targets.repeat(2), views=0, temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT,
                     **DIST_SETTINGS)
    for parts in (with_views, originals):
        assert parts["inter"].item() == pytest.approx(GOLDEN_INTER, rel=1e-5)
        assert parts["intra"].item() == pytest.approx(GOLDEN_INTRA, rel=1e-5)
        assert parts["loss"].item() == pytest.approx(GOLDEN_DIST, rel=1e-5)


def test_dist_is_zero_for_a_student_equal_to_the_teacher_up_to_a_shift():
    """Pearson relations ignore a per-row shift of the logits (softmax does too) and a perfect match."""
    teacher = torch.randn(8, 5, generator=torch.Generator().manual_seed(4))
    parts = dist(teacher + 3.0, teacher, torch.zeros(8, dtype=torch.long), views=0, temperature=4.0, alpha=0.0,
                 kd_weight=1.0, inter_weight=1.0, intra_weight=1.0)
    assert parts["inter"].item() == pytest.approx(0.0, abs=1e-4)  # T^2 = 16 times float32 rounding
    assert parts["intra"].item() == pytest.approx(0.0, abs=1e-4)


def test_every_registered_method_has_settings_and_takes_the_epoch():
    assert set(METHODS) == set(METHOD_SETTINGS)
    for name in METHODS:
        loss_fn, needs_teacher = build_loss(METHOD_SETTINGS[name]())
        assert needs_teacher == (name != "vanilla")
        parts = loss_fn(*_tensors(), 1, epoch=2.5)
        assert torch.isfinite(parts["loss"]) and parts["loss"].item() > 0


def test_build_loss_fills_method_defaults_from_the_shared_settings():
    """train.py may pass the shared MethodConfig; the method's own settings then take their defaults."""
    loss_fn, _ = build_loss(MethodConfig(name="dkd", temperature=T, alpha=ALPHA, kd_weight=KD_WEIGHT))
    defaults = DKDMethod()
    assert loss_fn.keywords == {"temperature": T, "alpha": ALPHA, "kd_weight": KD_WEIGHT,
                                "tckd_weight": defaults.tckd_weight, "nckd_weight": defaults.nckd_weight,
                                "warmup_epochs": defaults.warmup_epochs}
