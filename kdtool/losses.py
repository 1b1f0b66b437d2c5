"""Distillation methods behind one interface, and the one place where they meet cross-entropy.

A method's *term* is ``fn(student_logits, teacher_logits, targets, views, *, epoch, **settings) -> dict``:
its distillation term under ``"distill"`` (already x T^2 and weighted within the method), and its
named parts beside it. Logits follow the joint batch layout of `kdtool.augment`: rows
``[originals (B); view 1 (B); ...; view V (B)]``; ``targets`` holds the B plain class labels of the
originals (JDA views share them). ``epoch`` is the fractional number of epochs elapsed (DKD's
warm-up reads it; the others ignore it).

`Objective` adds cross-entropy (with the recipe's label smoothing) and the weights, once, for every
method::

    loss = kd_weight * (alpha * CE_smoothed(all samples) + (1 - alpha) * distill)

and `vanilla` is the CE alone. A method is a term here plus its settings class in `kdtool.recipe`
(``METHOD_SETTINGS``), registered together in ``METHODS``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from kdtool.errors import KdtoolError, Registry, validation_message
from kdtool.recipe import METHOD_SETTINGS, MethodConfig, VanillaMethod

LossFn = Callable[..., dict]  # (student_logits, teacher_logits | None, targets, views, *, epoch=0.0) -> dict


def per_sample_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) for each row, summed over classes."""
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def all_targets(targets: torch.Tensor, views: int) -> torch.Tensor:
    """The labels of every row of the joint batch (each view keeps its original's label)."""
    return targets.repeat(1 + views)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, views: int,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over every sample (originals and views), with label smoothing."""
    return F.cross_entropy(student_logits.float(), all_targets(targets, views), label_smoothing=label_smoothing)


def kd(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float) -> dict:
    """Hinton KD over every sample: T^2 * mean KL(P(t) || P(s))."""
    kl = per_sample_kl(teacher_logits, student_logits, temperature).mean()
    return {"distill": temperature**2 * kl, "kl": kl}


def ccd_weights(teacher_logits: torch.Tensor, views: int) -> torch.Tensor:
    """w = 1 + cos(t_orig, t_view) for each augmented row (raw logits), in [0, 2]."""
    batch = teacher_logits.shape[0] // (1 + views)
    originals = teacher_logits[:batch].float().repeat(views, 1)
    return 1 + F.cosine_similarity(originals, teacher_logits[batch:].float(), dim=1)


def ccd(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float) -> dict:
    """Cosine Confidence Distillation: T^2 * (L_orig + L_aug) / 2, where L_orig is the mean KL on the
    originals and L_aug = mean_i (1 + cos(t_o,i, t_a,i)) * KL(P(t_a,i) || P(s_a,i)) on the views.
    Without views it is plain KD on the originals.
    """
    kl = per_sample_kl(teacher_logits, student_logits, temperature)
    batch = targets.shape[0]
    kl_orig = kl[:batch].mean()
    if views == 0:
        return {"distill": temperature**2 * kl_orig, "kl_orig": kl_orig}
    weights = ccd_weights(teacher_logits, views).detach()
    kl_aug = (weights * kl[batch:]).mean()
    return {"distill": temperature**2 * (kl_orig + kl_aug) / 2, "kl_orig": kl_orig, "kl_aug": kl_aug,
            "weight_mean": weights.mean()}


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


def dkd_warmup(epoch: float, warmup_epochs: float, ramp: str = "per_epoch") -> float:
    """DKD's warm-up factor after `epoch` (fractional) epochs of training.

    ``per_epoch`` is the authors' schedule (mdistiller ``DKD.forward_train``): min(e / warmup, 1) with
    e the 1-based number of the epoch being trained, so 1 / warmup throughout epoch 1 and no warm-up
    at all for warmup 1. ``per_step`` ramps continuously from 0 at the first step.
    """
    if warmup_epochs <= 0:
        return 1.0
    elapsed = math.floor(epoch) + 1 if ramp == "per_epoch" else epoch
    return min(elapsed / warmup_epochs, 1.0)


def dkd(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float,
        tckd_weight: float, nckd_weight: float, warmup_epochs: float, warmup_ramp: str = "per_epoch") -> dict:
    """Decoupled KD (Zhao et al., CVPR 2022) over every sample, originals and views.

    TCKD = KL(b_t || b_s) on the binary (target, non-target) split of softmax(z / T);
    NCKD = KL(p̂_t || p̂_s) on softmax(z / T) over the non-target classes alone; both x T^2, averaged
    over samples. The term is warmup * (tckd_weight * TCKD + nckd_weight * NCKD) (see `dkd_warmup`).
    """
    if student_logits.shape[1] < 2:
        raise KdtoolError(f"method dkd needs at least 2 classes, got {student_logits.shape[1]}")
    labels = all_targets(targets, views)
    binary_t, rest_t = _target_and_rest(teacher_logits, labels, temperature)
    binary_s, rest_s = _target_and_rest(student_logits, labels, temperature)
    tckd = temperature**2 * _kl_from_log(binary_t, binary_s).mean()
    nckd = temperature**2 * _kl_from_log(F.log_softmax(rest_t / temperature, dim=1),
                                         F.log_softmax(rest_s / temperature, dim=1)).mean()
    warmup = dkd_warmup(epoch, warmup_epochs, warmup_ramp)
    return {"distill": warmup * (tckd_weight * tckd + nckd_weight * nckd), "tckd": tckd, "nckd": nckd,
            "warmup": tckd.new_tensor(warmup)}


# ---------------------------------------------------------------- DIST
def _mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of the Pearson correlation of a's and b's rows (eps as the authors' code)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist(student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0, temperature: float,
         inter_weight: float, intra_weight: float) -> dict:
    """DIST (Huang et al., NeurIPS 2022) over the joint batch (originals and views together).

    With Y = softmax(z / T) (rows: samples, columns: classes):
    inter = T^2 * (1 - mean over samples of pearson(Y_s[i], Y_t[i])),
    intra = T^2 * (1 - mean over classes of pearson(Y_s[:, c], Y_t[:, c])),
    and the term is inter_weight * inter + intra_weight * intra.
    """
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter = temperature**2 * (1 - _mean_pearson(y_s, y_t))
    intra = temperature**2 * (1 - _mean_pearson(y_s.T, y_t.T))
    return {"distill": inter_weight * inter + intra_weight * intra, "inter": inter, "intra": intra}


# ---------------------------------------------------------------- the combiner
# Settings every distillation method shares; the combiner reads them, the terms do not.
COMBINER_SETTINGS = ("name", "alpha", "kd_weight")


@dataclass(frozen=True)
class Objective:
    """The training loss of one method: CE (label-smoothed) and the method's term, weighted once.

    ``kd_weight * (alpha * CE + (1 - alpha) * term["distill"])``, or CE alone without a term (vanilla).
    Returns ``{"loss", "ce", <the term's parts>}``.
    """

    term: Optional[Callable[..., dict]] = None
    settings: dict = field(default_factory=dict)  # the term's own keyword settings (temperature, ...)
    alpha: float = 1.0
    kd_weight: float = 1.0
    label_smoothing: float = 0.0

    def __call__(self, student_logits, teacher_logits, targets, views: int, *, epoch: float = 0.0) -> dict:
        ce = cross_entropy(student_logits, targets, views, self.label_smoothing)
        if self.term is None:
            return {"loss": ce, "ce": ce}
        parts = self.term(student_logits, teacher_logits, targets, views, epoch=epoch, **self.settings)
        loss = self.kd_weight * (self.alpha * ce + (1 - self.alpha) * parts["distill"])
        return {"loss": loss, "ce": ce, **parts}


@dataclass(frozen=True)
class Method:
    term: Optional[Callable[..., dict]]  # None: cross-entropy alone

    @property
    def needs_teacher(self) -> bool:
        return self.term is not None


METHODS: Registry[Method] = Registry("method", {
    "vanilla": Method(None),
    "kd": Method(kd),
    "ccd": Method(ccd),
    "dkd": Method(dkd),
    "dist": Method(dist),
})


def build_loss(cfg: MethodConfig | VanillaMethod, label_smoothing: float = 0.0) -> tuple[Objective, bool]:
    """The recipe's method as ``(loss_fn, needs_teacher)``, cross-entropy smoothed by `label_smoothing`.

    `cfg` may be the method's own settings class or the shared `MethodConfig`; the settings it does
    not set take the method's defaults, and a setting the method does not have is refused.
    """
    method = METHODS[cfg.name]
    settings_class = METHOD_SETTINGS[cfg.name]
    if not isinstance(cfg, settings_class):
        try:
            cfg = settings_class.model_validate(cfg.model_dump(exclude_unset=True) | {"name": cfg.name})
        except ValidationError as exc:
            raise KdtoolError(f"method {cfg.name}: {validation_message(exc)}") from None
    if method.term is None:
        return Objective(label_smoothing=label_smoothing), False
    settings = cfg.model_dump(exclude=set(COMBINER_SETTINGS))
    return Objective(method.term, settings, cfg.alpha, cfg.kd_weight, label_smoothing), True
