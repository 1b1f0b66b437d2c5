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

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

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
# Every op takes x (n, C, H, W) float32 holding integers 0..255, the magnitude and the sign
# (±1.0, shared by the n rows) and returns integers 0..255 of the same shape. x is a scratch
# buffer that the op may overwrite: in-place ops avoid large temporaries, which dominate the
# CPU cost. Geometric ops are gathers along the flattened pixels with index maps that depend
# only on (size, magnitude, sign), built once and cached.

def _factor(m: float, sign: float) -> float:
    # Pillow receives the factor as a C float: round the double 1 ± m to float32 once.
    return torch.tensor(1.0 + m * sign, dtype=torch.float64).float().item()


def _blend(degenerate, x: torch.Tensor, factor: float) -> torch.Tensor:
    """Image.blend(degenerate, x, factor) in place in x: float32 arithmetic, truncated, clipped."""
    return x.sub_(degenerate).mul_(factor).add_(degenerate).floor_().clamp_(0, 255)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601-2, 16-bit fixed point, rounded); (n, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    # The products and sums are integers below 2**24, so float32 is exact in any order.
    luma = x[:, 0:1] * 19595
    luma.add_(x[:, 1:2], alpha=38470).add_(x[:, 2:3], alpha=7471).add_(32768)
    return luma.div_(65536).floor_()


def _lut_index(x: torch.Tensor) -> torch.Tensor:
    """x's values offset by 256 * (row, channel): flat indices into an (n * C, 256) table."""
    n, c = x.shape[:2]
    offsets = torch.arange(0, n * c * 256, 256, device=x.device, dtype=torch.int32).view(-1, 1)
    return x.reshape(n * c, -1).to(torch.int32).add_(offsets).view(-1)


def _apply_lut(lut: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-(row, channel) LUTs (n * C, 256) applied through the flat index of `_lut_index`."""
    return lut.float().view(-1).index_select(0, index).view_as(x)


def _autocontrast(x, m, sign):
    n, c = x.shape[:2]
    lo, hi = x.reshape(n * c, -1).aminmax(dim=1)
    lo, span = lo.double(), (hi - lo).double()
    # A true division (255.0 / tensor would multiply by a reciprocal and round differently).
    scale = torch.full_like(span, 255.0) / span.clamp(min=1)
    # The LUT in float64, as ImageOps.autocontrast computes int(ix * scale + offset).
    ix = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (ix * scale[:, None] - lo[:, None] * scale[:, None]).trunc().clamp(0, 255)
    return _apply_lut(torch.where(span[:, None] > 0, lut, ix), _lut_index(x), x)


def _equalize(x, m, sign):
    n, c = x.shape[:2]
    index = _lut_index(x)
    hist = torch.bincount(index, minlength=n * c * 256).view(n * c, 256)
    nonzero = hist > 0
    last = 255 - nonzero.flip(1).int().argmax(1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    identity = (nonzero.sum(1, keepdim=True) <= 1) | (step == 0)
    return _apply_lut(torch.where(identity, torch.arange(256, device=x.device), lut), index, x)


def _posterize(x, bits, sign):
    q = float(2 ** (8 - int(bits)))
    return x.div_(q).floor_().mul_(q)


def _solarize(x, threshold, sign):
    return torch.where(x < threshold, x, 255 - x, out=x)


def _invert(x, m, sign):
    return x.neg_().add_(255)


def _contrast(x, m, sign):
    luma = _luma(x)
    mean = (luma.sum((1, 2, 3), dtype=torch.float64) / luma[0].numel() + 0.5).floor()
    return _blend(mean.float().view(-1, 1, 1, 1), x, _factor(m, sign))


def _brightness(x, m, sign):
    return x.mul_(_factor(m, sign)).floor_().clamp_(0, 255)  # blend with black


def _color(x, m, sign):
    if x.shape[1] == 1:  # Pillow: the degenerate of an L image is the image itself
        return x
    return _blend(_luma(x), x, _factor(m, sign))


def _sharpness(x, m, sign):
    h, w = x.shape[2:]
    if h < 3 or w < 3:
        return x
    # ImageFilter.SMOOTH (3x3 ones, centre 5, / 13), rounded: a box sum plus 4x the centre
    # (integer sums, exact). Pillow leaves the one-pixel border as it is, and blending a pixel
    # with itself is the identity, so only the interior changes.
    across = x[:, :, :, :-2] + x[:, :, :, 1:-1] + x[:, :, :, 2:]
    interior = x[:, :, 1:-1, 1:-1]
    smooth = (across[:, :, :-2] + across[:, :, 1:-1]).add_(across[:, :, 2:]).add_(interior, alpha=4)
    smooth.div_(13).add_(0.5).floor_()
    _blend(smooth, interior, _factor(m, sign))
    return x


@dataclass(frozen=True)
class _PixelMap:
    """out.flat[..., i] = x.flat[..., index[i]] (or grey where `outside`), i over H * W."""

    index: torch.Tensor  # int64 (H * W,)
    outside: torch.Tensor  # bool (H, W)


def _nearest_map(iy: torch.Tensor, ix: torch.Tensor, h: int, w: int) -> _PixelMap:
    iy, ix = torch.broadcast_tensors(iy, ix)
    outside = (ix < 0) | (ix >= w) | (iy < 0) | (iy >= h)
    return _PixelMap((iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).flatten(), outside)


def _remap(x: torch.Tensor, pixel_map: _PixelMap) -> torch.Tensor:
    n, c, h, w = x.shape
    out = x.reshape(n * c, h * w).index_select(1, pixel_map.index).view_as(x)
    return out.masked_fill_(pixel_map.outside, _GREY)


@functools.lru_cache(maxsize=64)
def _translate_map(axis: int, h: int, w: int, shift: int, device: torch.device) -> _PixelMap:
    ix = torch.arange(w, device=device).view(1, w)
    iy = torch.arange(h, device=device).view(h, 1)
    return _nearest_map(iy, ix + shift, h, w) if axis == 0 else _nearest_map(iy + shift, ix, h, w)


def _translate(axis: int):
    """Image.transform(AFFINE (1, 0, tx, 0, 1, ty), NEAREST, grey fill), t = ±m * size.

    Pillow reads the input pixel floor(i + 0.5 + t) for output pixel i (its scaling path).
    """
    def op(x, m, sign):
        h, w = x.shape[2:]
        shift = math.floor(0.5 + m * (w if axis == 0 else h) * sign)
        return _remap(x, _translate_map(axis, h, w, shift, x.device))
    return op


@functools.lru_cache(maxsize=64)
def _rotate_map(degrees: float, h: int, w: int, device: torch.device) -> _PixelMap:
    """The matrix Image.rotate builds, in the 16.16 fixed point of Pillow's affine_fixed."""
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    xs = torch.arange(w, device=device, dtype=torch.int64).view(1, w)
    ys = torch.arange(h, device=device, dtype=torch.int64).view(h, 1)
    ix = (fix(c + a * 0.5 + b * 0.5) + ys * fix(b) + xs * fix(a)) >> 16
    iy = (fix(f + d * 0.5 + e * 0.5) + ys * fix(e) + xs * fix(d)) >> 16
    return _nearest_map(iy, ix, h, w)


def _rotate(x, degrees, sign):
    """Image.rotate(degrees) (counter-clockwise about the centre, NEAREST), grey fill."""
    h, w = x.shape[2:]
    return _remap(x, _rotate_map(degrees, h, w, x.device))


@dataclass(frozen=True)
class _ShearPlan:
    """A horizontal shear of (H, W) planes: bands of rows that share an integer shift, the
    fractional offset of each row, and Pillow's own per-pixel taps for exact recomputation."""

    bands: tuple[tuple[int, int, int], ...]  # (first row, end row, shift of the first tap)
    pad: tuple[int, int]  # edge columns to replicate on the left and right
    frac: torch.Tensor  # float32 (H, 1)
    irregular: torch.Tensor  # bool (H, 1): rows whose pixels do not all share the row's shift
    taps: torch.Tensor  # int64 (4, H * W): flat input pixel of each tap of each output pixel
    frac64: torch.Tensor  # float64 (H * W,)
    outside: torch.Tensor  # bool (H, W)


@functools.lru_cache(maxsize=64)
def _shear_plan(h: int, w: int, shear: float, device: torch.device) -> _ShearPlan:
    # Pillow's point arithmetic, in float64: source x = 1 * (x + 0.5) + shear * (y + 0.5).
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5).view(h, 1)
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5).view(1, w)
    src = xs + shear * ys
    pos = src - 0.5
    base = pos.floor()
    frac = pos - base
    shift = base.long() - torch.arange(w, device=device)  # input column - output column
    row_shift = shift[:, 0].tolist()
    bands, start = [], 0
    for y in range(1, h + 1):
        if y == h or row_shift[y] != row_shift[start]:
            bands.append((start, y, row_shift[start] - 1))
            start = y
    taps = (base.long() + torch.arange(-1, 3, device=device).view(4, 1, 1)).clamp_(0, w - 1)
    taps += torch.arange(h, device=device).view(h, 1) * w
    return _ShearPlan(
        bands=tuple(bands),
        pad=(max(0, 1 - min(row_shift)), max(0, max(row_shift) + 2)),
        frac=frac[:, :1].float(),
        irregular=(shift != shift[:, :1]).any(1, keepdim=True),
        taps=taps.view(4, h * w),
        frac64=frac.flatten(),
        outside=(src < 0) | (src >= w),
    )


# |error| of the float32 Horner sum below: <= ~8 roundings of 2**-24 * 1530 (the largest
# |p2| + |p3| + |p4|) < 1e-3; beyond this distance from an integer its truncation is Pillow's.
_SHEAR_F32_MARGIN = 2e-3


def _shear_rows(x: torch.Tensor, shear: float) -> torch.Tensor:
    """Horizontal bicubic shear of x (n, C, H, W), one band of equal-shift rows at a time
    (slices of the edge-padded rows, small enough to stay in the CPU caches)."""
    n, c, h, w = x.shape
    plan = _shear_plan(h, w, shear, x.device)
    planes = x.reshape(n * c, h, w)
    left, right = plan.pad
    padded = torch.cat([planes[:, :, :1].expand(-1, -1, left), planes,
                        planes[:, :, -1:].expand(-1, -1, right)], dim=2)
    out = torch.empty_like(planes)
    redo_at = []
    for first, end, shift in plan.bands:
        start = left + shift
        v1, v2, v3, v4 = (padded[:, first:end, start + j:start + j + w] for j in range(4))
        d = plan.frac[first:end]
        # Pillow's Horner form v2 + d * (p2 + d * (p3 + d * p4)); the p's are small integers.
        p2 = v3 - v1
        p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
        p4 = (v2 - v1).add_(v4).sub_(v3)
        delta = torch.addcmul(p2, torch.addcmul(p3, p4, d), d).mul_(d)
        redo = (delta - delta.round()).abs_() < _SHEAR_F32_MARGIN
        redo &= (p2 != 0) | (p3 != 0) | (p4 != 0)  # flat: delta is exactly 0 in both
        redo |= plan.irregular[first:end]
        out[:, first:end] = delta.add_(v2).clamp_(0, 255).floor_()
        plane, row, col = redo.nonzero(as_tuple=True)
        redo_at.append((plane, (row + first) * w + col))
    plane, pixel = (torch.cat(parts) for parts in zip(*redo_at))
    if len(plane):
        flat = planes.reshape(n * c, h * w)
        v1, v2, v3, v4 = (flat[plane, plan.taps[k, pixel]].double() for k in range(4))
        d = plan.frac64[pixel]
        exact = v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (v2 - v1 + v4 - v3)))
        out.view(n * c, h * w)[plane, pixel] = exact.clamp_(0, 255).floor_().float()
    return out.view_as(x).masked_fill_(plan.outside, _GREY)


def _shear_x(x, m, sign):
    """Image.transform(AFFINE (1, ±m, 0, 0, 1, 0), BICUBIC, grey fill).

    The input point of an output pixel centre stays on the pixel centres of its row, so
    Pillow's bicubic (a = -1, clamped neighbours, truncated) reduces to 1-D along the row.
    The sum runs in float32; the few pixels whose result lies within the float32 error of an
    integer are recomputed in float64 as Pillow computes them, so truncation agrees.
    """
    return _shear_rows(x, m * sign)


def _shear_y(x, m, sign):
    """Image.transform(AFFINE (1, 0, 0, ±m, 1, 0), BICUBIC): Pillow's arithmetic is symmetric
    in x and y, so this is the horizontal shear of the transposed image."""
    return _shear_rows(x.transpose(2, 3).contiguous(), m * sign).transpose(2, 3).contiguous()


_OPS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "autocontrast": _autocontrast,
    "contrast": _contrast,
    "posterize": _posterize,
    "solarize": _solarize,
    "translateX": _translate(0),
    "translateY": _translate(1),
    "shearX": _shear_x,
    "shearY": _shear_y,
    "brightness": _brightness,
    "sharpness": _sharpness,
    "invert": _invert,
    "color": _color,
    "equalize": _equalize,
    "rotate": _rotate,
}
_SIGNED_OPS = frozenset({"contrast", "brightness", "sharpness", "color", "shearX", "shearY",
                         "translateX", "translateY"})


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
        # One device->host copy of the draws per batch; row indices go back asynchronously.
        fire, sign = params.fire.cpu(), params.sign.cpu()
        touched = fire.any(1).nonzero().flatten()
        if len(touched) == 0:
            return out
        fire, sign = fire[touched], sign[touched]
        touched = touched.to(images.device, non_blocking=True)
        # The touched rows stay on the 0..255 integer grid from the first op to the last.
        work = out.index_select(0, touched).float().mul_(255).round_().clamp_(0, 255)
        for k, op in enumerate(self.policy.ops):
            signs = (-1.0, 1.0) if op.name in _SIGNED_OPS else (None,)
            for op_sign in signs:
                chosen = fire[:, k] if op_sign is None else fire[:, k] & (sign[:, k] == op_sign)
                rows = chosen.nonzero().flatten()
                if len(rows) == len(work):
                    work = _OPS[op.name](work, op.magnitude, op_sign or 1.0)
                elif len(rows):
                    rows = rows.to(images.device, non_blocking=True)
                    x = work.index_select(0, rows)
                    work.index_copy_(0, rows, _OPS[op.name](x, op.magnitude, op_sign or 1.0))
        out.index_copy_(0, touched, work.div_(255).to(out.dtype))
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
