"""JDA (Joint Data Augmentation): fixed AutoAugment-style op chains, batched on tensors.

Each op of a policy's chain fires independently per sample with probability ``p`` at a fixed
magnitude; ops with a direction (contrast, brightness, sharpness, colour, shear, translate) draw
a random sign per sample, so the factor is ``1 ± m``. Geometric ops fill with grey 128.

The ops follow Pillow's uint8 algorithms (``ImageOps``, ``ImageEnhance``, ``Image.transform``)
on a float batch ``(N, C, H, W)`` in [0, 1] (C = 3 or 1), on whatever device it lives on,
without per-image Python loops. Each op runs only on the rows where it fires: it rounds its
input to the 1/255 grid, computes on the 0..255 scale with Pillow's rounding/truncation and
writes back ``value / 255``, so a row is touched only by the ops that fire on it and a row on
which nothing fires comes back bit-exactly unchanged.

Batch layout of :func:`joint_batch` (what the trainer, teacher and loss rely on)::

    rows [0, B)                  the B originals, unchanged
    rows [B + v*B, B + (v+1)*B)  augmented view v+1 of originals 0..B-1 (v = 0..V-1)

i.e. ``(B * (1 + V), C, H, W)``; augmented sample ``v*B + i`` is view ``v+1`` of original ``i``
and uses row ``v*B + i`` of the :class:`JDAParams` (view-major).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import KdtoolError, Registry

__all__ = [
    "Op", "Policy", "POLICIES", "JDAParams", "JointAugment", "build_jda", "joint_batch",
]

_GREY = 128.0


@dataclass(frozen=True)
class Op:
    """One op of a chain: its name and fixed magnitude (0 when the op takes none)."""

    name: str
    magnitude: float = 0.0


@dataclass(frozen=True)
class Policy:
    """A named op chain and its default firing probability."""

    name: str
    ops: tuple[Op, ...]
    p: float


def _chain(*ops: tuple) -> tuple[Op, ...]:
    return tuple(Op(*op) for op in ops)


# Magnitudes as DESIGN.md lists them (the reference derives them from np.linspace grids).
_CIFAR100 = _chain(
    ("autocontrast",), ("contrast", 0.3), ("posterize", 8), ("solarize", 142),
    ("translateY", 0.40), ("shearX", 0.17), ("brightness", 0.3), ("shearY", 0.0),
    ("translateX", 0.05), ("sharpness", 0.5), ("invert",), ("color", 0.4), ("equalize",),
    ("rotate", 10.0),
)
_CIFAR10 = _chain(
    ("invert",), ("rotate", 6.7), ("shearY", 0.27), ("posterize", 4), ("autocontrast",),
    ("color", 0.3), ("sharpness", 0.9), ("equalize",), ("contrast", 0.7), ("translateY", 0.15),
    ("brightness", 0.6), ("solarize", 199), ("translateX", 0.15), ("shearX", 0.27),
)
_IMAGENET = _chain(
    ("posterize", 4), ("solarize", 114), ("equalize",), ("posterize", 5), ("equalize",),
    ("equalize",), ("solarize", 171), ("posterize", 6), ("rotate", 10.0), ("equalize",),
    ("rotate", 26.7), ("rotate", 30.0), ("equalize",), ("invert",), ("color", 0.4),
    ("rotate", 26.7), ("color", 0.8), ("sharpness", 0.7), ("shearX", 0.17), ("color", 0.0),
    ("equalize",), ("solarize", 114), ("invert",), ("color", 0.4), ("equalize",),
)

POLICIES: Registry[Policy] = Registry("JDA policy", {
    "cifar100": Policy("cifar100", _CIFAR100, 0.3),
    "cifar10": Policy("cifar10", _CIFAR10, 0.5),
    "imagenet": Policy("imagenet", _IMAGENET, 0.2),
    "digits": Policy("digits", _CIFAR100, 0.3),
})


# ---------------------------------------------------------------- ops on the 0..255 scale
# Every op takes x (n, C, H, W) float32 holding integers 0..255, the magnitude and the
# per-row sign (n,) and returns integers 0..255 of the same shape. x is a scratch copy that
# the op may overwrite: in-place ops avoid large temporaries, which dominate the CPU cost.

def _factor(m: float, sign: torch.Tensor) -> torch.Tensor:
    # Pillow receives the factor as a C float: round the double 1 ± m to float32 once.
    return (1.0 + m * sign.double()).float().view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor) in place in x: float32 arithmetic, truncated, clipped."""
    return x.sub_(degenerate).mul_(factor).add_(degenerate).floor_().clamp_(0, 255)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601-2, 16-bit fixed point, rounded); (n, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    # The products and sum are integers below 2**24, so float32 is exact here.
    return torch.div(r * 19595 + g * 38470 + b * 7471 + 32768, 65536, rounding_mode="floor")


def _autocontrast(x, m, sign):
    n, c = x.shape[:2]
    flat = x.reshape(n * c, -1)
    lo, hi = flat.amin(1).double(), flat.amax(1).double()
    span = hi - lo
    # A true division (255.0 / tensor would multiply by a reciprocal and round differently).
    scale = torch.full_like(span, 255.0) / span.clamp(min=1)
    # The LUT in float64, as ImageOps.autocontrast computes int(ix * scale + offset).
    ix = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (ix * scale[:, None] - lo[:, None] * scale[:, None]).trunc().clamp(0, 255)
    lut = torch.where(span[:, None] > 0, lut, ix).float()
    return lut.gather(1, flat.long()).view_as(x)


def _equalize(x, m, sign):
    n, c = x.shape[:2]
    idx = x.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx))
    nonzero = hist > 0
    last = 255 - nonzero.flip(1).int().argmax(1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    identity = (nonzero.sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, torch.arange(256, device=x.device), lut)
    return lut.gather(1, idx).view_as(x).float()


def _posterize(x, bits, sign):
    q = float(2 ** (8 - int(bits)))
    return x.div_(q).floor_().mul_(q)


def _solarize(x, threshold, sign):
    return torch.where(x < threshold, x, 255 - x)


def _invert(x, m, sign):
    return x.neg_().add_(255)


def _contrast(x, m, sign):
    luma = _luma(x)
    count = luma[0].numel()
    mean = (luma.reshape(len(x), -1).long().sum(1).double() / count + 0.5).floor()
    return _blend(mean.float().view(-1, 1, 1, 1), x, _factor(m, sign))


def _brightness(x, m, sign):
    return _blend(0.0, x, _factor(m, sign))


def _color(x, m, sign):
    if x.shape[1] == 1:  # Pillow: the degenerate of an L image is the image itself
        return x
    return _blend(_luma(x).expand_as(x), x, _factor(m, sign))


def _sharpness(x, m, sign):
    n, c, h, w = x.shape
    degenerate = x.clone()  # blended into x below, so it cannot alias x
    if h >= 3 and w >= 3:
        # ImageFilter.SMOOTH, rounded; Pillow leaves the one-pixel border as it is.
        kernel = x.new_tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]).expand(c, 1, 3, 3)
        degenerate[:, :, 1:-1, 1:-1] = (F.conv2d(x, kernel, groups=c) / 13 + 0.5).floor()
    return _blend(degenerate, x, _factor(m, sign))


def _centres(size: int, device) -> torch.Tensor:
    return torch.arange(size, device=device, dtype=torch.float32) + 0.5


def _gather_nearest(x: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor) -> torch.Tensor:
    """out[.., y, x] = x[.., iy, ix] for integer source maps (n or 1, H, W); grey outside."""
    n, ch, h, w = x.shape
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).long().expand(n, h, w)
    out = x.reshape(n, ch, h * w).gather(2, flat.reshape(n, 1, h * w).expand(n, ch, h * w))
    return torch.where(inside.unsqueeze(1), out.view_as(x), _GREY)


def _translate(axis: int):
    """Image.transform(AFFINE (1, 0, tx, 0, 1, ty), NEAREST, grey fill), t = ±m * size.

    Pillow reads the input pixel floor(i + 0.5 + t) for output pixel i (its scaling path).
    """
    def op(x, m, sign):
        n, _, h, w = x.shape
        shift = (0.5 + m * (w if axis == 0 else h) * sign.double()).floor().long().view(n, 1, 1)
        ix = torch.arange(w, device=x.device).view(1, 1, w)
        iy = torch.arange(h, device=x.device).view(1, h, 1)
        return _gather_nearest(x, ix + shift, iy) if axis == 0 else _gather_nearest(x, ix, iy + shift)
    return op


def _rotate(x, degrees, sign):
    """Image.rotate(degrees) (counter-clockwise about the centre, NEAREST), grey fill.

    Uses the matrix Image.rotate builds and the 16.16 fixed-point arithmetic of Pillow's
    affine_fixed, so the source pixel of every output pixel is the same as Pillow's.
    """
    h, w = x.shape[2:]
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    xs = torch.arange(w, device=x.device, dtype=torch.int64).view(1, 1, w)
    ys = torch.arange(h, device=x.device, dtype=torch.int64).view(1, h, 1)
    ix = (fix(c + a * 0.5 + b * 0.5) + ys * fix(b) + xs * fix(a)) >> 16
    iy = (fix(f + d * 0.5 + e * 0.5) + ys * fix(e) + xs * fix(d)) >> 16
    return _gather_nearest(x, ix, iy)


def _shear(axis: int):
    """Shear along x (axis 0) or y (axis 1), as Image.transform(AFFINE, BICUBIC, grey fill).

    The input point of an output pixel centre stays on a pixel centre across the shear axis,
    so Pillow's bicubic (a = -1, clamped neighbours, truncated) reduces to 1-D along it.
    Computed in float64 like Pillow, so that truncation lands on the same integer.
    """
    def op(x, m, sign):
        n, ch, h, w = x.shape
        x = x.double()
        s = (m * sign.double()).view(n, 1, 1)
        ys = _centres(h, x.device).double().view(1, h, 1)
        xs = _centres(w, x.device).double().view(1, 1, w)
        src, size, dim = (xs + s * ys, w, 3) if axis == 0 else (ys + s * xs, h, 2)
        inside = (src >= 0) & (src < size)
        pos = src - 0.5
        base = pos.floor()
        frac = (pos - base).unsqueeze(1)
        v1, v2, v3, v4 = (
            x.gather(dim, (base + k).clamp(0, size - 1).long().unsqueeze(1).expand_as(x))
            for k in (-1, 0, 1, 2)
        )
        # Pillow's Horner form; the p's are small integers, hence exact in any order.
        p4 = (v2 - v1).add_(v4).sub_(v3)
        p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
        p2 = v3.sub_(v1)
        out = p4.mul_(frac).add_(p3).mul_(frac).add_(p2).mul_(frac).add_(v2)
        out.clamp_(0, 255).floor_().masked_fill_(~inside.unsqueeze(1), _GREY)
        return out.float()
    return op


_OPS: dict[str, Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]] = {
    "autocontrast": _autocontrast,
    "contrast": _contrast,
    "posterize": _posterize,
    "solarize": _solarize,
    "translateX": _translate(0),
    "translateY": _translate(1),
    "shearX": _shear(0),
    "shearY": _shear(1),
    "brightness": _brightness,
    "sharpness": _sharpness,
    "invert": _invert,
    "color": _color,
    "equalize": _equalize,
    "rotate": _rotate,
}


# ---------------------------------------------------------------- public API
@dataclass
class JDAParams:
    """The random draws for n samples: which op fires on which sample, and its sign."""

    fire: torch.Tensor  # bool (n, n_ops)
    sign: torch.Tensor  # float (n, n_ops), each ±1

    def __len__(self) -> int:
        return self.fire.shape[0]

    def rows(self, index: slice) -> "JDAParams":
        """The draws for a slice of the samples (e.g. this process's share of a global batch)."""
        return JDAParams(self.fire[index], self.sign[index])


class JointAugment:
    """A JDA policy with its firing probability: ``sample`` draws, ``apply`` augments."""

    def __init__(self, policy: Policy | str, p: float | None = None):
        if isinstance(policy, str):
            policy = POLICIES[policy]
        if not isinstance(policy, Policy):
            raise KdtoolError(f"JDA policy must be a name or a Policy, got {type(policy).__name__}")
        unknown = [op.name for op in policy.ops if op.name not in _OPS]
        if unknown:
            raise KdtoolError(f"JDA policy {policy.name!r} has unknown ops {unknown}; known: "
                              + ", ".join(sorted(_OPS)))
        p = policy.p if p is None else float(p)
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise KdtoolError(f"JDA p must be in [0, 1], got {p}")
        self.policy = policy
        self.p = p

    def __repr__(self) -> str:
        return f"JointAugment({self.policy.name!r}, p={self.p})"

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> JDAParams:
        """Draw firing masks and signs for n samples from `generator` (on its device)."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        shape = (n, len(self.policy.ops))
        fire = torch.rand(shape, generator=generator, device=gen_device) < self.p
        sign = torch.randint(0, 2, shape, generator=generator, device=gen_device).float() * 2 - 1
        if device is not None:
            fire, sign = fire.to(device), sign.to(device)
        return JDAParams(fire, sign)

    def apply(self, images: torch.Tensor, params: JDAParams) -> torch.Tensor:
        """Augment float images in [0, 1] (N, C, H, W) with the draws in `params` (N rows)."""
        if images.ndim != 4 or not images.is_floating_point() or images.shape[1] not in (1, 3):
            raise KdtoolError(f"JDA expects float images (N, C in {{1, 3}}, H, W), got "
                              f"{images.dtype} {tuple(images.shape)}")
        expected = (images.shape[0], len(self.policy.ops))
        if tuple(params.fire.shape) != expected or tuple(params.sign.shape) != expected:
            raise KdtoolError(f"JDA params have shape {tuple(params.fire.shape)}, "
                              f"expected {expected}")
        out = images.clone()
        # One device->host copy of the masks per batch; the row indices go back asynchronously.
        fire = params.fire.cpu()
        sign = params.sign.to(images.device)
        for k, op in enumerate(self.policy.ops):
            rows = fire[:, k].nonzero().flatten()
            if len(rows) == 0:
                continue
            rows = rows.to(images.device, non_blocking=True)
            x = out.index_select(0, rows).float().mul_(255).round_().clamp_(0, 255)
            y = _OPS[op.name](x, op.magnitude, sign[rows, k]).div_(255)
            out.index_copy_(0, rows, y.to(out.dtype))
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample draws for the batch and apply them."""
        return self.apply(images, self.sample(len(images), generator, device=images.device))


def build_jda(cfg) -> JointAugment | None:
    """The JointAugment a recipe's JDAConfig asks for; None when JDA is off (policy null)."""
    if cfg.policy is None:
        return None
    return JointAugment(cfg.policy, cfg.p)


def joint_batch(images: torch.Tensor, augment: JointAugment | None, views: int,
                params: JDAParams | None) -> torch.Tensor:
    """[originals; view 1 of all B; ...; view V of all B] -> (B * (1 + V), C, H, W).

    `params` covers B * V samples, view-major (row v*B + i is view v+1 of image i); None
    draws them from the default generator. `augment` None or `views` 0 -> the originals.
    """
    if augment is None or views == 0:
        return images
    if views < 0:
        raise KdtoolError(f"JDA views must be >= 0, got {views}")
    b = images.shape[0]
    if params is None:
        params = augment.sample(b * views, device=images.device)
    if len(params) != b * views:
        raise KdtoolError(f"JDA params cover {len(params)} samples, expected {b} x {views} views")
    augmented = augment.apply(images.repeat(views, 1, 1, 1), params)
    return torch.cat([images, augmented])
