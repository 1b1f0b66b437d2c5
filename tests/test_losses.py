"""vanilla / kd / ccd / dkd / dist and the combiner against independent computations.

The references below are written in float64 numpy straight from the papers' formulas (softmax by
exp/sum, DKD's binary and renormalised non-target distributions built from the full softmax, Pearson
written out), not from kdtool's code, and checked at 10, 100 and 1000 classes, several
temperatures, CE weights other than one half and with label smoothing, so that a swap of alpha and
1 - alpha, a lost T^2 or an ignored setting fails a test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdtool.losses import (METHODS, Objective, build_loss, ccd, ccd_weights, dist, dkd, dkd_warmup, kd,
                           per_sample_kl)
from kdtool.recipe import METHOD_SETTINGS, CCDMethod, DISTMethod, DKDMethod, KDMethod, MethodConfig, VanillaMethod


# ---------------------------------------------------------------- references (float64, from the papers)
def np_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    e = np.exp(z / temperature - (z / temperature).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def ref_ce(student: np.ndarray, labels: np.ndarray, smoothing: float) -> float:
    """Cross-entropy against (1 - eps) * one-hot + eps / C (PyTorch's label smoothing), mean over rows."""
    log_p = np.log(np_softmax(student))
    nll = -log_p[np.arange(len(labels)), labels]
    return float(((1 - smoothing) * nll - smoothing * log_p.mean(axis=1)).mean())


def ref_kd(student, teacher, temperature, **_) -> float:
    return float(temperature**2 * np_kl(np_softmax(teacher, temperature), np_softmax(student, temperature)).mean())


def ref_ccd(student, teacher, temperature, views, **_) -> float:
    """CCD (DESIGN.md): T^2 (mean KL on originals + mean (1 + cos(t_o, t_a)) KL on views) / 2."""
    b = len(student) // (1 + views)
    kl = np_kl(np_softmax(teacher, temperature), np_softmax(student, temperature))
    if views == 0:
        return float(temperature**2 * kl.mean())
    originals = np.tile(teacher[:b], (views, 1))
    cos = (originals * teacher[b:]).sum(1) / (np.linalg.norm(originals, axis=1) * np.linalg.norm(teacher[b:], axis=1))
    return float(temperature**2 * (kl[:b].mean() + ((1 + cos) * kl[b:]).mean()) / 2)


def ref_dkd_parts(student, teacher, labels, temperature):
    """Per-sample (TCKD, NCKD) x T^2, Zhao et al. Eq. (2)-(4): b = [p_t, 1 - p_t]; p̂_i = p_i / (1 - p_t)."""
    rows = np.arange(len(labels))
    p_s, p_t = np_softmax(student, temperature), np_softmax(teacher, temperature)
    b_s = np.stack([p_s[rows, labels], 1 - p_s[rows, labels]], axis=1)
    b_t = np.stack([p_t[rows, labels], 1 - p_t[rows, labels]], axis=1)
    others = np.ones_like(p_s, dtype=bool)
    others[rows, labels] = False
    hat_s = p_s[others].reshape(len(labels), -1) / b_s[:, 1:]
    hat_t = p_t[others].reshape(len(labels), -1) / b_t[:, 1:]
    return temperature**2 * np_kl(b_t, b_s), temperature**2 * np_kl(hat_t, hat_s)


def ref_dkd(student, teacher, temperature, labels, tckd_weight, nckd_weight, warmup, **_) -> float:
    tckd, nckd = ref_dkd_parts(student, teacher, labels, temperature)
    return float(warmup * (tckd_weight * tckd.mean() + nckd_weight * nckd.mean()))


def np_pearson(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    """Pearson correlation with the DIST authors' eps in the denominator (dist_kd.py). Without it a class
    whose probabilities are all ~1e-5 over the batch (1000 classes, T = 1) would weigh as much as any other."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + eps))


def ref_dist(student, teacher, temperature, inter_weight, intra_weight, **_) -> float:
    """DIST (Huang et al.): T^2 (1 - mean Pearson) over samples (inter) and over classes (intra)."""
    y_s, y_t = np_softmax(student, temperature), np_softmax(teacher, temperature)
    inter = np.mean([np_pearson(a, b) for a, b in zip(y_s, y_t)])
    intra = np.mean([np_pearson(a, b) for a, b in zip(y_s.T, y_t.T)])
    return float(temperature**2 * (inter_weight * (1 - inter) + intra_weight * (1 - intra)))


def logits(classes: int, rows: int, seed: int, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, (rows, classes))


def batch(classes: int, b: int = 4, views: int = 1, seed: int = 0):
    """(student, teacher, targets of the originals) in float64 numpy."""
    student, teacher = logits(classes, b * (1 + views), seed), logits(classes, b * (1 + views), seed + 1)
    targets = np.random.default_rng(seed + 2).integers(0, classes, b)
    return student, teacher, targets


def run(loss_fn, student, teacher, targets, views, epoch=0.0) -> dict:
    teacher = None if teacher is None else torch.tensor(teacher, dtype=torch.float32)
    return loss_fn(torch.tensor(student, dtype=torch.float32), teacher, torch.tensor(targets), views, epoch=epoch)


# ---------------------------------------------------------------- every method through the one combiner
CASES = [  # (settings class, reference term, its own settings)
    (KDMethod, ref_kd, {}),
    (CCDMethod, ref_ccd, {}),
    (DKDMethod, ref_dkd, {"tckd_weight": 1.5, "nckd_weight": 6.0, "warmup_epochs": 4.0}),
    (DISTMethod, ref_dist, {"inter_weight": 1.0, "intra_weight": 2.5}),
]


@pytest.mark.parametrize("classes", [10, 100, 1000])
@pytest.mark.parametrize("temperature, alpha, kd_weight, smoothing", [
    (1.0, 0.2, 1.0, 0.0), (2.0, 0.7, 2.0, 0.1), (4.0, 1 / 3, 3.0, 0.0), (8.0, 0.9, 0.5, 0.2)])
@pytest.mark.parametrize("settings_class, reference, own", CASES, ids=[c[0].__name__ for c in CASES])
def test_loss_matches_the_papers_formula(settings_class, reference, own, classes, temperature, alpha, kd_weight,
                                         smoothing):
    """loss = kd_weight * (alpha * CE_smoothed + (1 - alpha) * term), all samples, one JDA view."""
    student, teacher, targets = batch(classes, seed=classes)
    labels = np.tile(targets, 2)
    epoch = 1.5  # DKD: epoch 2 of training, warm-up 2 / 4 by the authors' schedule
    cfg = settings_class(temperature=temperature, alpha=alpha, kd_weight=kd_weight, **own)
    parts = run(build_loss(cfg, smoothing)[0], student, teacher, targets, views=1, epoch=epoch)
    term = reference(student, teacher, temperature=temperature, views=1, labels=labels, warmup=2 / 4, **own)
    ce = ref_ce(student, labels, smoothing)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["distill"].item() == pytest.approx(term, rel=2e-4, abs=1e-6)
    assert parts["loss"].item() == pytest.approx(kd_weight * (alpha * ce + (1 - alpha) * term), rel=2e-4)


@pytest.mark.parametrize("settings_class, reference, own", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_swapped_alpha_is_caught(settings_class, reference, own):
    """alpha weighs CE and 1 - alpha the term: the swapped mix is a different number for every method."""
    student, teacher, targets = batch(100, seed=7)
    labels = np.tile(targets, 2)
    parts = run(build_loss(settings_class(alpha=0.2, kd_weight=1.0, **own))[0], student, teacher, targets, 1, epoch=9.0)
    term = reference(student, teacher, temperature=settings_class().temperature, views=1, labels=labels, warmup=1.0,
                     **own)
    ce = ref_ce(student, labels, 0.0)
    right, swapped = 0.2 * ce + 0.8 * term, 0.8 * ce + 0.2 * term
    assert abs(right - swapped) > 1e-2 * abs(right)  # the case can tell them apart
    assert parts["loss"].item() == pytest.approx(right, rel=2e-4)


def test_vanilla_is_smoothed_cross_entropy_alone():
    student, teacher, targets = batch(10)
    labels = np.tile(targets, 2)
    loss_fn, needs_teacher = build_loss(VanillaMethod(), 0.1)
    assert not needs_teacher
    with_teacher, without = run(loss_fn, student, teacher, targets, 1), run(loss_fn, student, None, targets, 1)
    expected = ref_ce(student, labels, 0.1)
    assert with_teacher["loss"].item() == without["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert set(with_teacher) == {"loss", "ce"}


@pytest.mark.parametrize("name", sorted(METHOD_SETTINGS))
def test_label_smoothing_changes_every_methods_loss(name):
    """CE is smoothed in the combiner, for every method: the loss moves by kd_weight * alpha * (CE_eps - CE_0)."""
    student, teacher, targets = batch(10, seed=3)
    labels = np.tile(targets, 2)
    cfg = METHOD_SETTINGS[name]()
    plain = run(build_loss(cfg, 0.0)[0], student, teacher, targets, 1, epoch=30.0)["loss"].item()
    smoothed = run(build_loss(cfg, 0.3)[0], student, teacher, targets, 1, epoch=30.0)["loss"].item()
    ce_weight = getattr(cfg, "kd_weight", 1.0) * getattr(cfg, "alpha", 1.0)
    shift = ce_weight * (ref_ce(student, labels, 0.3) - ref_ce(student, labels, 0.0))
    assert abs(shift) > 1e-3
    assert smoothed - plain == pytest.approx(shift, rel=1e-3)


# ---------------------------------------------------------------- DKD: the paper's identity and the authors' warm-up
@pytest.mark.parametrize("classes", [10, 100, 1000])
@pytest.mark.parametrize("temperature", [1.0, 3.0, 6.0])
def test_dkd_parts_recompose_classical_kd_per_sample(classes, temperature):
    """Zhao et al. Eq. (7), per sample and at one temperature: KL = TCKD + (1 - p_t) * NCKD, with p_t the
    *teacher's* probability of the target class (x T^2 on both sides).

    Over a batch the identity holds with the per-sample weights, mean KL = mean TCKD + mean((1 - p_t,i) NCKD_i),
    not with the batch means of its parts (checked below), so each row is its own batch here.
    """
    student, teacher, targets = batch(classes, b=6, views=0, seed=classes + int(temperature))
    weighted, tckds, nckds = [], [], []
    for i in range(6):
        row = slice(i, i + 1)
        parts = dkd(torch.tensor(student[row]), torch.tensor(teacher[row]), torch.tensor(targets[row]), views=0,
                    temperature=temperature, tckd_weight=1.0, nckd_weight=1.0, warmup_epochs=0.0)
        p_target = np_softmax(teacher[row], temperature)[0, targets[i]]
        kl = temperature**2 * per_sample_kl(torch.tensor(teacher[row]), torch.tensor(student[row]), temperature).item()
        assert kl == pytest.approx(parts["tckd"].item() + (1 - p_target) * parts["nckd"].item(), rel=1e-5, abs=1e-9)
        weighted.append((1 - p_target) * parts["nckd"].item())
        tckds.append(parts["tckd"].item())
        nckds.append(parts["nckd"].item())
    whole = dkd(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), views=0, temperature=temperature,
                tckd_weight=1.0, nckd_weight=1.0, warmup_epochs=0.0)
    assert ref_kd(student, teacher, temperature) == pytest.approx(whole["tckd"].item() + np.mean(weighted), rel=1e-5)
    assert (whole["tckd"].item(), whole["nckd"].item()) == pytest.approx((np.mean(tckds), np.mean(nckds)), rel=1e-5)


def test_dkd_identity_over_a_batch_needs_the_per_sample_weights():
    """With a confident and an unsure teacher row, the batch means of TCKD and NCKD with the mean p_t do
    not recompose the mean KL; the per-sample form does."""
    student, teacher, targets = batch(10, b=2, views=0, seed=29)
    teacher[0, targets[0]] += 8.0  # p_t near 1 on row 0, not on row 1 ...
    teacher[1, targets[1]] -= 8.0
    student[0] = teacher[0]  # ... and NCKD 0 on row 0, not on row 1: p_t and NCKD covary
    whole = dkd(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), views=0, temperature=2.0,
                tckd_weight=1.0, nckd_weight=1.0, warmup_epochs=0.0)
    tckd, nckd = ref_dkd_parts(student, teacher, targets, 2.0)
    p_target = np_softmax(teacher, 2.0)[np.arange(2), targets]
    mean_kl = ref_kd(student, teacher, 2.0)
    assert mean_kl == pytest.approx(np.mean(tckd + (1 - p_target) * nckd), rel=1e-9)
    batch_form = whole["tckd"].item() + (1 - p_target.mean()) * whole["nckd"].item()
    assert abs(batch_form - mean_kl) > 0.05 * mean_kl


def mdistiller_warmup(epoch_number: int, warmup: float) -> float:
    """mdistiller DKD.forward_train: min(kwargs["epoch"] / WARMUP, 1), its trainer counting epochs from 1."""
    return min(epoch_number / warmup, 1.0)


@pytest.mark.parametrize("warmup", [1, 5, 20])
def test_dkd_warmup_follows_the_authors_schedule_step_by_step(warmup):
    """What TrainStep passes (optimizer steps / steps per epoch) gives, at every step, the factor the
    authors use for the whole epoch that step is in (their WARMUP 1 = no warm-up at all)."""
    steps_per_epoch = 7
    for step in range(30 * steps_per_epoch):
        expected = mdistiller_warmup(step // steps_per_epoch + 1, warmup)
        assert dkd_warmup(step / steps_per_epoch, warmup) == expected
    assert dkd_warmup(0.0, 1) == 1.0 and dkd_warmup(0.0, 20) == 1 / 20


def test_dkd_warmup_scales_the_term_and_the_step_ramp_is_an_option():
    student, teacher, targets = batch(10, seed=5)
    cfg = DKDMethod(alpha=0.3, kd_weight=1.0, warmup_epochs=20.0)
    full = run(build_loss(cfg)[0], student, teacher, targets, 1, epoch=25.0)
    for epoch, factor in [(0.0, 1 / 20), (4.5, 5 / 20), (19.99, 1.0)]:
        parts = run(build_loss(cfg)[0], student, teacher, targets, 1, epoch=epoch)
        assert parts["warmup"].item() == pytest.approx(factor)
        assert parts["distill"].item() == pytest.approx(factor * full["distill"].item(), rel=1e-6)
    continuous = build_loss(cfg.model_copy(update={"warmup_ramp": "per_step"}))[0]
    assert run(continuous, student, teacher, targets, 1, epoch=4.5)["warmup"].item() == pytest.approx(4.5 / 20)
    assert run(continuous, student, teacher, targets, 1, epoch=0.0)["warmup"].item() == 0.0
    assert dkd_warmup(3.0, 0.0) == dkd_warmup(3.0, 0.0, "per_step") == 1.0


# ---------------------------------------------------------------- CCD and the batch layout
def test_ccd_weight_is_one_plus_cosine_in_0_2():
    originals = torch.tensor([[1.0, 2.0, 3.0], [1.0, -2.0, 0.5], [0.3, 0.1, -4.0]])
    views = torch.stack([originals[0], -originals[1], torch.tensor([4.0, -0.2, 1.0])])
    weights = ccd_weights(torch.cat([originals, views]), views=1)
    assert weights[0].item() == pytest.approx(2.0)  # identical logits
    assert weights[1].item() == pytest.approx(0.0, abs=1e-6)  # opposite logits
    a, b = originals[2].numpy(), views[2].numpy()
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert weights[2].item() == pytest.approx(1 + cos, rel=1e-5)
    random_weights = ccd_weights(torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), views=1)
    assert random_weights.min() >= 0 and random_weights.max() <= 2


def test_ccd_with_identical_teacher_views_weighs_the_views_2():
    """t_a == t_o gives w = 2: term = T^2 (KL_orig + 2 KL_aug) / 2."""
    student, teacher, targets = batch(10, b=3, seed=11)
    teacher[3:] = teacher[:3]
    parts = ccd(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), views=1, temperature=2.0)
    kl = np_kl(np_softmax(teacher, 2.0), np_softmax(student, 2.0))
    assert parts["weight_mean"].item() == pytest.approx(2.0)
    assert parts["distill"].item() == pytest.approx(4.0 * (kl[:3].mean() + 2 * kl[3:].mean()) / 2, rel=1e-5)


@pytest.mark.parametrize("views", [0, 2, 3])
def test_views_layout_originals_then_each_view(views):
    """Rows [orig (B); view 1 (B); ...]: view v of original i is row v*B + i, and keeps its label."""
    student, teacher, targets = batch(100, b=3, views=views, seed=views)
    loss_fn = build_loss(CCDMethod(temperature=3.0, alpha=0.25, kd_weight=1.0))[0]
    parts = run(loss_fn, student, teacher, targets, views)
    ce = ref_ce(student, np.tile(targets, 1 + views), 0.0)
    term = ref_ccd(student, teacher, 3.0, views)
    assert parts["loss"].item() == pytest.approx(0.25 * ce + 0.75 * term, rel=2e-4)


def test_dist_takes_the_joint_batch_as_one_batch():
    """2 originals + 1 view are DIST's 4 samples: the same as 4 originals with the same labels."""
    student, teacher, targets = batch(10, b=2, seed=13)
    loss_fn = build_loss(DISTMethod(temperature=2.0, inter_weight=1.0, intra_weight=2.0))[0]
    with_views = run(loss_fn, student, teacher, targets, 1)
    originals = run(loss_fn, student, teacher, np.tile(targets, 2), 0)
    assert with_views["loss"].item() == pytest.approx(originals["loss"].item(), rel=1e-6)


def test_dist_is_zero_for_a_student_equal_to_the_teacher_up_to_a_shift():
    """Pearson relations ignore a per-row shift of the logits (softmax does too) and a perfect match."""
    teacher = torch.randn(8, 5, generator=torch.Generator().manual_seed(4))
    parts = dist(teacher + 3.0, teacher, torch.zeros(8, dtype=torch.long), views=0, temperature=4.0,
                 inter_weight=1.0, intra_weight=1.0)
    assert parts["inter"].item() == pytest.approx(0.0, abs=1e-4)  # T^2 = 16 times float32 rounding
    assert parts["intra"].item() == pytest.approx(0.0, abs=1e-4)


# ---------------------------------------------------------------- the teacher is frozen
@pytest.mark.parametrize("name", ["kd", "ccd", "dkd", "dist"])
def test_gradients_reach_the_student_only(name):
    """The teacher's logits (and CCD's weights) are constants of the loss."""
    student, teacher, targets = (torch.tensor(a) for a in batch(10, b=2, seed=17))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss_fn = build_loss(METHOD_SETTINGS[name]())[0]
    loss = loss_fn(student, teacher, targets, 1, epoch=5.0)["loss"]
    (student_grad,) = torch.autograd.grad(loss, [student], retain_graph=True)
    assert student_grad.abs().sum() > 0
    with torch.no_grad():  # what the trainer passes: teacher logits without a graph
        frozen_teacher = teacher * 1
    loss_fn(student, frozen_teacher, targets, 1, epoch=5.0)["loss"].backward()
    assert teacher.grad is None and student.grad is not None


def test_ccd_weights_are_detached_from_the_teacher():
    student, teacher, targets = batch(10, b=2, seed=19)
    parts = ccd(torch.tensor(student), torch.tensor(teacher, requires_grad=True), torch.tensor(targets), views=1,
                temperature=2.0)
    assert not parts["weight_mean"].requires_grad


# ---------------------------------------------------------------- building by name
def test_every_registered_method_has_settings_and_takes_the_epoch():
    assert set(METHODS) == set(METHOD_SETTINGS)
    student, teacher, targets = batch(10, seed=23)
    for name in METHODS:
        loss_fn, needs_teacher = build_loss(METHOD_SETTINGS[name]())
        assert needs_teacher == (name != "vanilla")
        parts = run(loss_fn, student, teacher, targets, 1, epoch=2.5)
        assert torch.isfinite(parts["loss"]) and parts["loss"].item() > 0


def test_build_loss_fills_method_defaults_from_the_shared_settings():
    """A shared MethodConfig works: the method's own settings take their defaults, the combiner reads alpha
    and kd_weight, the term gets the rest."""
    loss_fn, _ = build_loss(MethodConfig(name="dkd", temperature=2.0, alpha=0.3, kd_weight=1.5), 0.1)
    defaults = DKDMethod()
    assert isinstance(loss_fn, Objective) and loss_fn.term is dkd
    assert (loss_fn.alpha, loss_fn.kd_weight, loss_fn.label_smoothing) == (0.3, 1.5, 0.1)
    assert loss_fn.settings == {"temperature": 2.0, "tckd_weight": defaults.tckd_weight,
                                "nckd_weight": defaults.nckd_weight, "warmup_epochs": defaults.warmup_epochs,
                                "warmup_ramp": "per_epoch"}
    assert build_loss(MethodConfig(name="dist"))[0].alpha == DISTMethod().alpha  # the method's own defaults


def test_build_loss_refuses_a_setting_the_method_does_not_have():
    from kdtool.errors import KdtoolError

    with pytest.raises(KdtoolError, match="method vanilla: temperature"):
        build_loss(MethodConfig(name="vanilla", temperature=2.0))


def test_dist_defaults_are_the_authors_ce_1_plus_dist_2():
    loss_fn = build_loss(DISTMethod())[0]
    assert loss_fn.kd_weight * loss_fn.alpha == pytest.approx(1.0)
    assert loss_fn.kd_weight * (1 - loss_fn.alpha) == pytest.approx(2.0)
    assert math.isclose(DISTMethod().temperature, 4.0)
