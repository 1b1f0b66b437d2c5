"""JDA (Joint Data Augmentation): fixed AutoAugment-style op chains, batched on tensors.

Each op of a policy's chain fires independently per sample with probability ``p`` at a fixed
magnitude; ops with a direction (contrast, brightness, sharpness, colour, shear, translate) draw
a random sign per sample, so the factor is ``1 ± m``. Geometric ops fill with grey 128.

The ops follow Pillow's uint8 algorithms (``ImageOps``, ``ImageEnhance``, ``Image.transform``)
on a float batch ``(N, C, H, W)`` in [0, 1] (C = 3 or 1), on whatever device it lives on,
without per-image Python loops. The rows on which at least one op fires are rounded once to
the 1/255 grid and held as uint8 on the 0..255 scale; each op runs only on the rows where it
fires, with Pillow's integer/float32/float64 arithmetic, rounding and truncation (mostly as
exact integer maths or lookups in tables computed with that arithmetic), and the rows come
back as ``value / 255``. So a row is touched only by the ops that fire on it and a row on which
nothing fires comes back bit-exactly unchanged. On the CPU the touched rows go through the
chain in blocks of a few MiB so that the temporaries stay in the caches; on other devices the
whole batch is one block (no per-sample host synchronisation).

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
# Every op takes x (n, C, H, W) uint8 (contiguous), the magnitude and the sign (±1.0, shared by
# the n rows) and returns uint8 of the same shape; it may overwrite x. Working in uint8 keeps
# the row gathers/scatters of the chain and the geometric gathers 4x smaller than float32.
# Pillow's per-pixel arithmetic is reproduced either with exact integer maths or through
# tables of the 256 (or 256 x 256) possible inputs, computed with Pillow's float32/float64
# arithmetic once and cached: a table lookup is one int32 index pass plus one gather.

@functools.lru_cache(maxsize=64)
def _factor(m: float, sign: float) -> float:
    # Pillow receives the factor as a C float: round the double 1 ± m to float32 once.
    return torch.tensor(1.0 + m * sign, dtype=torch.float64).float().item()


@functools.lru_cache(maxsize=64)
def _blend_table(factor: float, device: torch.device) -> torch.Tensor:
    """uint8 (256 * 256,): entry d * 256 + v is Image.blend(degenerate d, image v, factor),
    Pillow's float32 d + factor * (v - d), truncated and clipped to 0..255."""
    d = torch.arange(256, dtype=torch.float32, device=device).view(256, 1)
    v = torch.arange(256, dtype=torch.float32, device=device).view(1, 256)
    return (v - d).mul_(factor).add_(d).floor_().clamp_(0, 255).to(torch.uint8).flatten()


@functools.lru_cache(maxsize=16)
def _sharpen_table(factor: float, device: torch.device) -> torch.Tensor:
    """uint8 (3316 * 256,): entry s * 256 + v is the blend of the SMOOTH value of a pixel whose
    weighted 3x3 sum (ones, centre 5) is s, i.e. floor(s / 13 + 0.5) in float32, with v."""
    s = torch.arange(13 * 255 + 1, dtype=torch.float32, device=device)
    smooth = s.div_(13).add_(0.5).floor_().long().view(-1, 1) * 256
    v = torch.arange(256, device=device).view(1, 256)
    return _blend_table(factor, device)[(smooth + v).flatten()]


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an int32 index of any shape (one gather, no int64 index)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def _luma(wide: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601-2, 16-bit fixed point, rounded) of int32 (n, C, H, W):
    int32 (n, 1, H, W). (All operands share a dtype: mixed-dtype arithmetic takes a slow,
    non-vectorised path on the CPU.)"""
    if wide.shape[1] == 1:
        return wide.clone()
    luma = wide[:, 0:1] * 19595
    luma.add_(wide[:, 1:2], alpha=38470).add_(wide[:, 2:3], alpha=7471).add_(32768)
    return luma.bitwise_right_shift_(16)


def _channel_index(x: torch.Tensor) -> torch.Tensor:
    """x's values offset by 256 * (row, channel): int32 (n * C, H * W) indices into an
    (n * C, 256) table."""
    n, c = x.shape[:2]
    offsets = torch.arange(0, n * c * 256, 256, device=x.device, dtype=torch.int32).view(-1, 1)
    return x.view(n * c, -1).to(torch.int32).add_(offsets)


def _autocontrast(x, m, sign):
    n, c = x.shape[:2]
    lo, hi = x.view(n * c, -1).aminmax(dim=1)
    lo, span = lo.double(), (hi.double() - lo.double())
    # A true division (255.0 / tensor would multiply by a reciprocal and round differently).
    scale = torch.full_like(span, 255.0) / span.clamp(min=1)
    # The LUT in float64, as ImageOps.autocontrast computes int(ix * scale + offset).
    ix = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (ix * scale[:, None] - lo[:, None] * scale[:, None]).trunc().clamp(0, 255)
    lut = torch.where(span[:, None] > 0, lut, ix).to(torch.uint8)
    return _lookup(lut.view(-1), _channel_index(x)).view_as(x)


def _equalize(x, m, sign):
    n, c = x.shape[:2]
    index = _channel_index(x)
    hist = torch.bincount(index.view(-1), minlength=n * c * 256).view(n * c, 256)
    nonzero = hist > 0
    last = 255 - nonzero.flip(1).int().argmax(1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    identity = (nonzero.sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, torch.arange(256, device=x.device), lut).to(torch.uint8)
    return _lookup(lut.view(-1), index).view_as(x)


def _posterize(x, bits, sign):
    bits = int(bits)
    if bits >= 8:
        return x
    return x.bitwise_and_(256 - 2 ** (8 - max(bits, 0)))  # ImageOps: i & ~(2**(8-bits) - 1)


@functools.lru_cache(maxsize=64)
def _solarize_table(threshold: float, device: torch.device) -> torch.Tensor:
    ix = torch.arange(256, device=device)
    return torch.where(ix < threshold, ix, 255 - ix).to(torch.uint8)


def _solarize(x, threshold, sign):
    # ImageOps.solarize: i if i < threshold else 255 - i (a LUT: torch.where on uint8 is slow).
    return _lookup(_solarize_table(float(threshold), x.device), x.to(torch.int32))


def _invert(x, m, sign):
    return x.bitwise_not_()  # 255 - x on uint8


def _contrast(x, m, sign):
    n = x.shape[0]
    wide = x.to(torch.int32)
    luma = _luma(wide)
    # ImageStat's mean: the exact integer sum over the count, in float64; int(mean + 0.5).
    mean = (luma.sum((1, 2, 3), dtype=torch.float64) / luma[0].numel() + 0.5).floor()
    index = wide.view(n, -1).add_(mean.to(torch.int32).mul_(256).view(n, 1))
    return _lookup(_blend_table(_factor(m, sign), x.device), index).view_as(x)


def _brightness(x, m, sign):
    # Blend with black: the degenerate row 0 of the blend table, a single 256-entry LUT.
    return _lookup(_blend_table(_factor(m, sign), x.device)[:256], x.to(torch.int32))


def _color(x, m, sign):
    if x.shape[1] == 1:  # Pillow: the degenerate of an L image is the image itself
        return x
    wide = x.to(torch.int32)
    index = wide.add_(_luma(wide).mul_(256))
    return _lookup(_blend_table(_factor(m, sign), x.device), index)


def _sharpness(x, m, sign):
    h, w = x.shape[2:]
    if h < 3 or w < 3:
        return x
    # ImageFilter.SMOOTH (3x3 ones, centre 5, / 13), rounded: a box sum plus 4x the centre
    # (integers <= 3315, exact in int32). Pillow leaves the one-pixel border as it is, and
    # blending a pixel with itself is the identity, so only the interior changes.
    wide = x.to(torch.int32)
    across = wide[:, :, :, :-2] + wide[:, :, :, 1:-1]
    across += wide[:, :, :, 2:]
    total = across[:, :, :-2] + across[:, :, 1:-1]
    total += across[:, :, 2:]
    interior = wide[:, :, 1:-1, 1:-1]
    index = total.add_(interior, alpha=4).mul_(256).add_(interior)  # s * 256 + v
    x[:, :, 1:-1, 1:-1] = _lookup(_sharpen_table(_factor(m, sign), x.device), index)
    return x


def _translate(axis: int):
    """Image.transform(AFFINE (1, 0, tx, 0, 1, ty), NEAREST, grey fill), t = ±m * size.

    Pillow reads the input pixel floor(i + 0.5 + t) for output pixel i (its scaling path):
    a shifted copy of the image, grey where the source falls outside it.
    """
    dim = 3 if axis == 0 else 2

    def op(x, m, sign):
        size = x.shape[dim]
        shift = math.floor(0.5 + m * size * sign)
        keep = size - abs(shift)
        if shift == 0:
            return x
        if keep <= 0:
            return x.fill_(int(_GREY))
        out = torch.empty_like(x)
        lo, hi = max(-shift, 0), max(-shift, 0) + keep  # output range read from the input
        out.narrow(dim, lo, keep).copy_(x.narrow(dim, max(shift, 0), keep))
        out.narrow(dim, 0, lo).fill_(int(_GREY))
        out.narrow(dim, hi, size - hi).fill_(int(_GREY))
        return out
    return op


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
    """One flat gather (int32 index; a gather along dim 1 and masked_fill are several times
    slower on the CPU) from the planes with a grey pixel appended to each, read for outside."""
    n, c, h, w = x.shape
    source = torch.cat([x.view(n * c, h * w), x.new_full((n * c, 1), int(_GREY))], dim=1)
    local = pixel_map.index.masked_fill(pixel_map.outside.flatten(), h * w).to(torch.int32)
    offsets = torch.arange(0, n * c * (h * w + 1), h * w + 1, dtype=torch.int32, device=x.device)
    return _lookup(source.view(-1), offsets.view(-1, 1) + local).view_as(x)


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

    bands: tuple[tuple[int, int, int], ...]  # (first row, end row, input column of tap 0)
    frac: torch.Tensor  # float32 (H, 1)
    check: torch.Tensor  # bool (H,): rows whose float32 result may need recomputation
    irregular: torch.Tensor | None  # bool (H, 1): rows whose pixels do not all share the
    # row's shift (None when there are none)
    taps: torch.Tensor  # int64 (4, H, W): input column of each tap of each output pixel
    frac64: torch.Tensor  # float64 (H, W)
    inside: torch.Tensor | None  # float32 (H, W): 1 inside, 0 where the fill shows (None: no fill)
    fill: torch.Tensor | None  # float32 (H, W): grey where the fill shows, else 0


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
    irregular = (shift != shift[:, :1]).any(1, keepdim=True)
    # A row whose offset is 0 reads its pixels exactly (v2 + 0 * ...): nothing to recompute.
    check = (frac[:, 0] != 0) | irregular[:, 0]
    taps = (base.long() + torch.arange(-1, 3, device=device).view(4, 1, 1)).clamp_(0, w - 1)
    outside = (src < 0) | (src >= w)
    has_fill = bool(outside.any())
    return _ShearPlan(
        bands=tuple(bands),
        frac=frac[:, :1].float(),
        check=check,
        irregular=irregular if bool(irregular.any()) else None,
        taps=taps,
        frac64=frac,
        inside=(~outside).float() if has_fill else None,
        fill=outside.float() * _GREY if has_fill else None,
    )


# |error| of the float32 Horner sum below: <= ~8 roundings of 2**-24 * 1530 (the largest
# |p2| + |p3| + |p4|) < 1e-3; beyond this distance from an integer its truncation is Pillow's.
_SHEAR_F32_MARGIN = 2e-3


def _shear_rows(planes: torch.Tensor, shear: float, transposed: bool = False) -> torch.Tensor:
    """Horizontal bicubic shear of contiguous uint8 planes (P, H, W), or with `transposed` the
    vertical one (the horizontal shear of the planes' transposed views, written back
    transposed: no transposed copies), as contiguous uint8 (P, H, W).

    The input point of an output pixel centre stays on the pixel centres of its row, so
    Pillow's bicubic (a = -1, clamped neighbours, truncated) reduces to 1-D along the row.
    The rows are first copied, band by band of equal integer shift, into float32 rows aligned
    on their first tap (edge columns replicated), so the arithmetic runs on whole tensors. The
    sum runs in float32; the few pixels whose result lies within the float32 error of an
    integer are recomputed in float64 as Pillow computes them, so truncation agrees.
    """
    rows_view = planes.transpose(1, 2) if transposed else planes
    p, h, w = rows_view.shape
    plan = _shear_plan(h, w, shear, planes.device)
    aligned = torch.empty(p, h, w + 3, dtype=torch.float32, device=planes.device)
    for first, end, s in plan.bands:  # aligned[:, y, t] = row y at input column clamp(t + s)
        band, src = aligned[:, first:end], rows_view[:, first:end]
        lo, hi = min(max(-s, 0), w + 3), max(min(w - s, w + 3), 0)
        if hi > lo:
            band[:, :, lo:hi] = src[:, :, lo + s:hi + s]
        if lo > 0:
            band[:, :, :lo] = src[:, :, :1]
        if hi < w + 3:
            band[:, :, hi:] = src[:, :, w - 1:]
    v1, v2, v3, v4 = (aligned[:, :, j:j + w] for j in range(4))
    d = plan.frac
    # Pillow's Horner form v2 + d * (p2 + d * (p3 + d * p4)); the p's are small integers,
    # exact in float32: p4 = a + b and p3 = -(a + p4) with a = v2 - v1, b = v4 - v3.
    # (In place where possible: fresh large CPU buffers cost page faults.)
    a = v2 - v1
    b = v4 - v3
    p2 = v3 - v1
    # 2 * margin where the taps differ, 0 where they are flat (delta is then exactly 0).
    tolerance = (a * a).addcmul_(b, b).addcmul_(p2, p2).clamp_max_(1).mul_(2 * _SHEAR_F32_MARGIN)
    p4 = b.add_(a)
    minus_p3 = a.add_(p4)
    y = p4.mul_(d).sub_(minus_p3).mul_(d).add_(p2).mul_(d).add_(v2).add_(_SHEAR_F32_MARGIN)
    result = torch.floor(y, out=minus_p3)
    # Within the margin of an integer (and not flat): recompute exactly.
    redo = torch.lt(y.sub_(result), tolerance)
    if plan.irregular is not None:
        redo |= plan.irregular
    result.clamp_(0, 255)
    if plan.inside is not None:
        result.mul_(plan.inside).add_(plan.fill)
    out = torch.empty_like(planes)
    out_rows = out.transpose(1, 2) if transposed else out
    out_rows.copy_(result)
    plane, row, col = redo.nonzero(as_tuple=True)
    keep = plan.check[row]
    plane, row, col = plane[keep], row[keep], col[keep]
    if len(plane):
        v1, v2, v3, v4 = (rows_view[plane, row, plan.taps[k, row, col]].double() for k in range(4))
        d = plan.frac64[row, col]
        exact = v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (v2 - v1 + v4 - v3)))
        exact = exact.clamp_(0, 255).floor_()
        if plan.inside is not None:
            exact = torch.where(plan.inside[row, col] > 0, exact, _GREY)
        out_rows[plane, row, col] = exact.to(torch.uint8)
    return out


def _shear_x(x, m, sign):
    """Image.transform(AFFINE (1, ±m, 0, 0, 1, 0), BICUBIC, grey fill)."""
    n, c, h, w = x.shape
    return _shear_rows(x.view(n * c, h, w), m * sign).view_as(x)


def _shear_y(x, m, sign):
    """Image.transform(AFFINE (1, 0, 0, ±m, 1, 0), BICUBIC): Pillow's arithmetic is symmetric
    in x and y, so this is the horizontal shear of the transposed image."""
    n, c, h, w = x.shape
    return _shear_rows(x.view(n * c, h, w), m * sign, transposed=True).view_as(x)


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


def _is_identity(name: str, m: float, sign: float, h: int, w: int) -> bool:
    """Whether the op leaves every image of size (h, w) exactly as it is (Pillow too)."""
    if name in ("contrast", "brightness", "sharpness", "color"):
        return _factor(m, sign) == 1.0  # blend(d, v, 1.0) = d + 1.0 * (v - d) = v
    if name in ("shearX", "shearY"):
        return m == 0
    if name in ("translateX", "translateY"):
        return math.floor(0.5 + m * (w if name == "translateX" else h) * sign) == 0
    if name == "posterize":
        return int(m) >= 8
    if name == "solarize":
        return math.ceil(m) > 255
    if name == "rotate":
        return m % 360.0 == 0  # Image.rotate returns a copy
    return False


# Bytes of uint8 rows per block of the chain on the CPU (their int32/float32 temporaries
# then stay within the last-level cache and are reused rather than page-faulted in).
_CPU_BLOCK_BYTES = 1 << 21


def _row_words(x: torch.Tensor) -> torch.Tensor:
    """x (n, ...) uint8 contiguous as (n, words) of the widest integer type that divides a row:
    row gathers/scatters then move 8-byte words instead of single bytes."""
    flat = x.view(x.shape[0], -1)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
        if flat.shape[1] % size == 0:
            return flat.view(dtype)
    return flat


def _gather_rows(work: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return _row_words(work).index_select(0, rows).view(torch.uint8).view(-1, *work.shape[1:])


def _scatter_rows(work: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    _row_words(work).index_copy_(0, rows, _row_words(x.contiguous()))


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
        # One device->host copy of the draws per batch; row indices go back asynchronously.
        fire, sign = params.fire.cpu().numpy(), params.sign.cpu().numpy()
        touched = fire.any(1).nonzero()[0]
        if len(touched) == 0:
            return images.clone()
        every_row = len(touched) == len(images)
        # One host mask per (op, sign) group: the rows of `touched` it fires on.
        groups = []
        h, w = images.shape[2:]
        for k, op in enumerate(self.policy.ops):
            for op_sign in ((-1.0, 1.0) if op.name in _SIGNED_OPS else (None,)):
                if not _is_identity(op.name, op.magnitude, op_sign or 1.0, h, w):
                    chosen = fire[touched, k]
                    if op_sign is not None:
                        chosen = chosen & ((sign[touched, k] > 0) == (op_sign > 0))
                    groups.append((_OPS[op.name], op.magnitude, op_sign or 1.0, chosen))
        out = torch.empty_like(images) if every_row else images.clone()
        # On the CPU the touched rows go through the chain in blocks small enough for the
        # caches (the chain is per-sample, so blocks are independent); elsewhere in one block.
        row_bytes = images[0].numel()
        block = max(1, _CPU_BLOCK_BYTES // row_bytes) if images.device.type == "cpu" else len(touched)
        # One float32 scratch block, reused (fresh large CPU buffers cost page faults).
        scratch = torch.empty((min(block, len(touched)),) + images.shape[1:], device=images.device)
        for start in range(0, len(touched), block):
            end = min(start + block, len(touched))
            scaled = scratch[:end - start]
            if every_row:
                scaled.copy_(images[start:end])
            else:
                at = torch.from_numpy(touched[start:end]).to(images.device, non_blocking=True)
                scaled.copy_(images.index_select(0, at))
            scaled.mul_(255)  # in float32, as x.float() * 255
            # The rows stay on the 0..255 integer grid, as uint8, from the first op to the last.
            work = scaled.round_().clamp_(0, 255).to(torch.uint8)
            for fn, magnitude, op_sign, chosen in groups:
                rows = chosen[start:end].nonzero()[0]
                if len(rows) == end - start:
                    work = fn(work, magnitude, op_sign)
                elif len(rows):
                    rows = torch.from_numpy(rows).to(images.device, non_blocking=True)
                    _scatter_rows(work, rows, fn(_gather_rows(work, rows), magnitude, op_sign))
            if every_row and images.dtype == torch.float32:
                out[start:end].copy_(work).div_(255)
            else:
                result = scaled.copy_(work).div_(255).to(images.dtype)
                if every_row:
                    out[start:end] = result
                else:
                    out.index_copy_(0, at, result)
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


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for one step's augmentation draws, a pure function of (seed, step)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63))
    return generator


def local_jda_params(augment: JointAugment, views: int, local_batch: int, accelerator, generator: torch.Generator) -> JDAParams:
    """Draw for the whole global batch and keep this process's rows, so results do not depend on the process count."""
    world, rank = accelerator.num_processes, accelerator.process_index
    drawn = augment.sample(views * local_batch * world, generator, accelerator.device)
    take = lambda t: t.view(views, world, local_batch, -1)[:, rank].reshape(views * local_batch, -1)  # noqa: E731
    return JDAParams(fire=take(drawn.fire), sign=take(drawn.sign))


@dataclass
class TrainViews:
    """Turns what the training loader yields into the joint batch the trainer feeds the models.

    The trainer treats a loader batch's first element as opaque and calls this with it; the
    result is float [0, 1] images on the accelerator's device, laid out ``[originals; view 1; ...]``
    (not yet normalised). ``views`` is 0 without JDA.
    """

    augment: Optional[JointAugment]
    views: int
    seed: int

    def __call__(self, images: torch.Tensor, step: int, accelerator) -> torch.Tensor:
        device = accelerator.device
        images = images.to(device, non_blocking=True).float().div_(255)
        if self.views:
            generator = step_generator(self.seed, step, device)
            params = local_jda_params(self.augment, self.views, images.shape[0], accelerator, generator)
            images = joint_batch(images, self.augment, self.views, params)
        return images


def build_train_views(cfg, seed: int) -> TrainViews:
    """The TrainViews for a recipe's JDAConfig (`views` 0 when JDA is off)."""
    augment = build_jda(cfg)
    return TrainViews(augment, cfg.views if augment is not None else 0, seed)
