"""Distillation methods behind one interface.

Every method is ``fn(student_logits, teacher_logits, targets, views, *, epoch=0.0) -> dict`` with the
scalar to optimise under ``"loss"`` and its named parts beside it, for the trainer to log. Logits
follow the joint batch layout of `kdtool.augment`: rows ``[originals (B); view 1 (B); ...; view V (B)]``;
``targets`` holds the B plain class labels of the originals (JDA views share them). ``epoch`` is the
fractional number of epochs elapsed (DKD's warm-up reads it; the others accept and ignore it).

A method is a loss function here plus its settings class in `kdtool.recipe` (``METHOD_SETTINGS``),
registered together in ``METHODS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from kdtool.errors import KdtoolError, Registry
from kdtool.recipe import METHOD_SETTINGS, MethodConfig

LossFn = Callable[..., dict]  # (student_logits, teacher_logits | None, targets, views, *, epoch=0.0) -> dict


def per_sample_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) for each row, summed over classes."""
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def _all_targets(targets: torch.Tensor, views: int) -> torch.Tensor:
    return targets.repeat(1 + views)


def vanilla(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0,
            label_smoothing: float = 0.0) -> dict:
    """Cross-entropy on every sample (originals and views); the teacher is ignored."""
    ce = F.cross_entropy(student_logits.float(), _all_targets(targets, views), label_smoothing=label_smoothing)
    return {"loss": ce, "ce": ce}


def kd(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float, alpha: float,
       kd_weight: float) -> dict:
    """Hinton KD over every sample: kd_weight * (alpha * CE + (1 - alpha) * T^2 * KL)."""
    ce = F.cross_entropy(student_logits.float(), _all_targets(targets, views))
    kl = per_sample_kl(teacher_logits, student_logits, temperature).mean()
    loss = kd_weight * (alpha * ce + (1 - alpha) * temperature**2 * kl)
    return {"loss": loss, "ce": ce, "kl": kl}


def ccd_weights(teacher_logits: torch.Tensor, views: int) -> torch.Tensor:
    """w = 1 + cos(t_orig, t_view) for each augmented row (raw logits), in [0, 2]."""
    batch = teacher_logits.shape[0] // (1 + views)
    originals = teacher_logits[:batch].float().repeat(views, 1)
    return 1 + F.cosine_similarity(originals, teacher_logits[batch:].float(), dim=1)


def ccd(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float, alpha: float,
        kd_weight: float) -> dict:
    """Cosine Confidence Distillation: KD on the originals plus cosine-weighted KD on the views.

    kd_weight * (alpha * CE(all) + (1 - alpha) * T^2 * (L_orig + L_aug) / 2), where
    L_aug = mean_i (1 + cos(t_o,i, t_a,i)) * KL(P(t_a,i) || P(s_a,i)).
    Without views it is plain KD on the originals.
    """
    ce = F.cross_entropy(student_logits.float(), _all_targets(targets, views))
    kl = per_sample_kl(teacher_logits, student_logits, temperature)
    batch = targets.shape[0]
    kl_orig = kl[:batch].mean()
    if views == 0:
        soft, parts = kl_orig, {}
    else:
        weights = ccd_weights(teacher_logits, views).detach()
        kl_aug = (weights * kl[batch:]).mean()
        soft, parts = (kl_orig + kl_aug) / 2, {"kl_aug": kl_aug, "weight_mean": weights.mean()}
    loss = kd_weight * (alpha * ce + (1 - alpha) * temperature**2 * soft)
    return {"loss": loss, "ce": ce, "kl_orig": kl_orig, **parts}


# ---------------------------------------------------------------- DKD
def _target_and_rest(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the binary (target, all other classes) probabilities, (N, 2), and the logits of the
    non-target classes, (N, C - 1), both from softmax(z / T)."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    is_target = F.one_hot(targets, logits.shape[1]).bool()
    log_binary = torch.stack([log_p[is_target], log_p.masked_fill(is_target, -torch.inf).logsumexp(dim=1)], dim=1)
    return log_binary, logits.float()[~is_target].view(logits.shape[0], -1)


def _kl_from_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def dkd(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float, alpha: float,
        kd_weight: float, tckd_weight: float, nckd_weight: float, warmup_epochs: float) -> dict:
    """Decoupled KD (Zhao et al., CVPR 2022) over every sample, originals and views.

    TCKD = KL(b_t || b_s) on the binary (target, non-target) split of softmax(z / T);
    NCKD = KL(p̂_t || p̂_s) on softmax(z / T) over the non-target classes alone; both x T^2.
    kd_weight * (alpha * CE + (1 - alpha) * ramp * (tckd_weight * TCKD + nckd_weight * NCKD)), with
    ramp = min(epoch / warmup_epochs, 1) (1 without warm-up).
    """
    if student_logits.shape[1] < 2:
        raise KdtoolError(f"method dkd needs at least 2 classes, got {student_logits.shape[1]}")
    labels = _all_targets(targets, views)
    ce = F.cross_entropy(student_logits.float(), labels)
    binary_t, rest_t = _target_and_rest(teacher_logits, labels, temperature)
    binary_s, rest_s = _target_and_rest(student_logits, labels, temperature)
    tckd = temperature**2 * _kl_from_log(binary_t, binary_s).mean()
    nckd = temperature**2 * _kl_from_log(F.log_softmax(rest_t / temperature, dim=1),
                                         F.log_softmax(rest_s / temperature, dim=1)).mean()
    ramp = min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    loss = kd_weight * (alpha * ce + (1 - alpha) * ramp * (tckd_weight * tckd + nckd_weight * nckd))
    return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd, "warmup": ce.new_tensor(ramp)}


# ---------------------------------------------------------------- DIST
def _mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of the Pearson correlation of a's and b's rows (eps as the authors' code)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float, alpha: float,
         kd_weight: float, inter_weight: float, intra_weight: float) -> dict:
    """DIST (Huang et al., NeurIPS 2022) over the joint batch (originals and views together).

    With Y = softmax(z / T) (rows: samples, columns: classes):
    inter = T^2 * (1 - mean over samples of pearson(Y_s[i], Y_t[i])),
    intra = T^2 * (1 - mean over classes of pearson(Y_s[:, c], Y_t[:, c])),
    kd_weight * (alpha * CE + (1 - alpha) * (inter_weight * inter + intra_weight * intra)).
    """
    ce = F.cross_entropy(student_logits.float(), _all_targets(targets, views))
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter = temperature**2 * (1 - _mean_pearson(y_s, y_t))
    intra = temperature**2 * (1 - _mean_pearson(y_s.T, y_t.T))
    loss = kd_weight * (alpha * ce + (1 - alpha) * (inter_weight * inter + intra_weight * intra))
    return {"loss": loss, "ce": ce, "inter": inter, "intra": intra}


# ---------------------------------------------------------------- registry
def _build_vanilla(cfg: MethodConfig, label_smoothing: float) -> LossFn:
    return partial(vanilla, label_smoothing=label_smoothing)


def _distillation(fn) -> Callable[[MethodConfig, float], LossFn]:
    """A builder binding every setting of the method's settings class (shared and its own) to `fn`."""
    return lambda cfg, _: partial(fn, **cfg.model_dump(exclude={"name"}))


@dataclass(frozen=True)
class Method:
    build: Callable[[MethodConfig, float], LossFn]
    needs_teacher: bool


METHODS: Registry[Method] = Registry("method", {
    "vanilla": Method(_build_vanilla, False),
    "kd": Method(_distillation(kd), True),
    "ccd": Method(_distillation(ccd), True),
    "dkd": Method(_distillation(dkd), True),
    "dist": Method(_distillation(dist), True),
})


def build_loss(cfg: MethodConfig, label_smoothing: float = 0.0) -> tuple[LossFn, bool]:
    """The recipe's method as ``(loss_fn, needs_teacher)``.

    `cfg` may be the method's own settings class or the shared `MethodConfig`, whose missing
    method-specific settings then take their defaults.
    """
    method = METHODS[cfg.name]
    settings_class = METHOD_SETTINGS[cfg.name]
    if not isinstance(cfg, settings_class):
        cfg = settings_class.model_validate(cfg.model_dump())
    return method.build(cfg, label_smoothing), method.needs_teacher
