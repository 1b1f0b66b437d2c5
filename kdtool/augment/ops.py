"""JDA ops on uint8 batches of images of one size (N, C, H, W), following Pillow's algorithms.

Every op takes x (n, C, H, W) uint8 (contiguous), the magnitude and the variant (the sign of a
signed op, shared by the n rows) and returns uint8 of the same shape; it may overwrite x.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from kdtool.errors import KdtoolError

GREY = 128.0
_GREY = GREY

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
    return _autocontrast_with(x, *x.view(n * c, -1).aminmax(dim=1))


def _autocontrast_with(x, lo, hi):
    """ImageOps.autocontrast of x given each (row, channel)'s lowest and highest value (n * C,)."""
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
    return _lookup(_equalize_lut(hist).view(-1), index).view_as(x)


def _equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize's uint8 LUTs (rows, 256) from each (row, channel)'s histogram (rows, 256)."""
    nonzero = hist > 0
    last = 255 - nonzero.flip(1).int().argmax(1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    identity = (nonzero.sum(1, keepdim=True) <= 1) | (step == 0)
    return torch.where(identity, torch.arange(256, device=hist.device), lut).to(torch.uint8)


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
    wide = x.to(torch.int32)
    luma = _luma(wide)
    # ImageStat's mean: the exact integer sum over the count, in float64; int(mean + 0.5).
    mean = (luma.sum((1, 2, 3), dtype=torch.float64) / luma[0].numel() + 0.5).floor()
    return _contrast_with(x, wide, mean, m, sign)


def _contrast_with(x, wide, mean, m, sign):
    """The blend of x (and its int32 copy `wide`) with each row's grey mean (n,), float64, integral."""
    n = x.shape[0]
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
    x[:, :, 1:-1, 1:-1] = _sharpened_interior(x, m, sign)
    return x


def _sharpened_interior(x, m, sign):
    """ImageEnhance.Sharpness of the pixels x[:, :, 1:-1, 1:-1] (their 3x3 neighbourhoods are inside x)."""
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
    return _lookup(_sharpen_table(_factor(m, sign), x.device), index)


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
    ix0, iy0, fb, fa, fe, fd = (int(v) for v in rotate_fixed(degrees, h, w))
    xs = torch.arange(w, device=device, dtype=torch.int64).view(1, w)
    ys = torch.arange(h, device=device, dtype=torch.int64).view(h, 1)
    ix = (ix0 + ys * fb + xs * fa) >> 16
    iy = (iy0 + ys * fe + xs * fd) >> 16
    return _nearest_map(iy, ix, h, w)


def rotate_fixed(degrees: float, h, w) -> tuple[np.ndarray, ...]:
    """Image.rotate's matrix about the centre of an h x w image (ints or int arrays), in the 16.16
    fixed point of Pillow's affine_fixed: the source column and row at output pixel (0, 0), then
    the column step per output row and column and the row step per output column and row."""
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = np.asarray(w) / 2, np.asarray(h) / 2  # float64, as Python's floats
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy

    def fix(v) -> np.ndarray:
        return np.floor(np.asarray(v, dtype=np.float64) * 65536.0 + 0.5).astype(np.int64)

    return fix(c + a * 0.5 + b * 0.5), fix(f + d * 0.5 + e * 0.5), fix(b), fix(a), fix(e), fix(d)


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


def _rot90(x, m, turns):
    """`turns` quarter turns counter-clockwise (Image.transpose ROTATE_90/180/270): exact, no fill."""
    h, w = x.shape[2:]
    if h != w and turns % 2 and x.shape[0] > 1:
        raise KdtoolError(f"JDA rot90 turns a batch of {h}x{w} images: a batch must be square "
                          f"(images of other shapes are turned one at a time in the loader)")
    return torch.rot90(x, int(turns), (2, 3)).contiguous()


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
    "rot90": _rot90,
}
_SIGNED_OPS = frozenset({"contrast", "brightness", "sharpness", "color", "shearX", "shearY",
                         "translateX", "translateY"})


def _variants(name: str) -> tuple[float, ...]:
    """The random variants an op draws from, as the third argument of its function: the sign of
    a signed op, the quarter turns of rot90, else a single (unused) 1."""
    if name in _SIGNED_OPS:
        return (-1.0, 1.0)
    if name == "rot90":
        return (1.0, 2.0, 3.0)
    return (1.0,)


def _is_identity(name: str, m: float, sign: float, h: int | None, w: int | None) -> bool:
    """Whether the op leaves every image of size (h, w) (of any size: None) exactly as it is (Pillow too)."""
    if name in ("contrast", "brightness", "sharpness", "color"):
        return _factor(m, sign) == 1.0  # blend(d, v, 1.0) = d + 1.0 * (v - d) = v
    if name in ("shearX", "shearY"):
        return m == 0
    if name in ("translateX", "translateY"):
        if h is None or w is None:  # images of any size: only m = 0 moves none
            return m == 0
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


def _host_rows(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(mask.nonzero()[0]).to(device, non_blocking=True)

