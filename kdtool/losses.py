"""Distillation methods behind one interface.

Every method is ``fn(student_logits, teacher_logits, targets, views) -> dict`` with the scalar to
optimise under ``"loss"`` and its named parts beside it, for the trainer to log. Logits follow
the joint batch layout of `kdtool.augment`: rows ``[originals (B); view 1 (B); ...; view V (B)]``;
``targets`` holds the B plain class labels of the originals (JDA views share them).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from kdtool.errors import Registry
from kdtool.recipe import MethodConfig

LossFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, int], dict]


def per_sample_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) for each row, summed over classes."""
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def _all_targets(targets: torch.Tensor, views: int) -> torch.Tensor:
    return targets.repeat(1 + views)


def vanilla(student_logits, teacher_logits, targets, views: int, *, label_smoothing: float = 0.0) -> dict:
    """Cross-entropy on every sample (originals and views); the teacher is ignored."""
    ce = F.cross_entropy(student_logits.float(), _all_targets(targets, views), label_smoothing=label_smoothing)
    return {"loss": ce, "ce": ce}


def kd(student_logits, teacher_logits, targets, views: int, *, temperature: float, alpha: float, kd_weight: float) -> dict:
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


def ccd(student_logits, teacher_logits, targets, views: int, *, temperature: float, alpha: float, kd_weight: float) -> dict:
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


def _build_vanilla(cfg: MethodConfig, label_smoothing: float) -> LossFn:
    return partial(vanilla, label_smoothing=label_smoothing)


def _distillation(fn) -> Callable[[MethodConfig, float], LossFn]:
    return lambda cfg, _: partial(fn, temperature=cfg.temperature, alpha=cfg.alpha, kd_weight=cfg.kd_weight)


@dataclass(frozen=True)
class Method:
    build: Callable[[MethodConfig, float], LossFn]
    needs_teacher: bool


METHODS: Registry[Method] = Registry(
    "method",
    {"vanilla": Method(_build_vanilla, False), "kd": Method(_distillation(kd), True), "ccd": Method(_distillation(ccd), True)},
)


def build_loss(cfg: MethodConfig, label_smoothing: float = 0.0) -> tuple[LossFn, bool]:
    """The recipe's method as ``(loss_fn, needs_teacher)``."""
    method = METHODS[cfg.name]
    return method.build(cfg, label_smoothing), method.needs_teacher
