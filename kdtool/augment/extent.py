"""JDA ops on a canvas of images of differing sizes, each on its own pixels.

A canvas is uint8 (n, C, H, W) whose row i holds an image of ``hw[i] = (h, w)`` in its top-left
corner, ``[0, h) x [0, w)``; what lies outside that extent is padding, never read for a result
inside it and left undefined. Each op equals the op of :mod:`kdtool.augment.ops` run on the image
alone: statistics (autocontrast, equalize, contrast) over its own pixels, geometry (rotate,
shear, translate, quarter turns) about its own centre with grey fill inside its own extent,
sharpness with Pillow's border rule at its own border. Every op runs on the whole canvas at once
(no per-image loop); the sizes come in as a host array ``hw`` (int64 (n, 2)).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from kdtool.augment.ops import (
    _OPS, GREY, _autocontrast_with, _channel_index, _contrast_with, _equalize_lut, _luma, _lookup,
    _sharpened_interior, rotate_fixed,
)


def _sizes(hw: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's height and width as int64 (n, 1, 1, 1) tensors on `device`."""
    sizes = torch.from_numpy(np.ascontiguousarray(hw, dtype=np.int64)).to(device, non_blocking=True)
    return sizes[:, 0].view(-1, 1, 1, 1), sizes[:, 1].view(-1, 1, 1, 1)


def inside(hw: np.ndarray, height: int, width: int, device: torch.device) -> torch.Tensor:
    """bool (n, 1, H, W): True on each row's own pixels."""
    h, w = _sizes(hw, device)
    ys = torch.arange(height, device=device).view(1, 1, height, 1)
    xs = torch.arange(width, device=device).view(1, 1, 1, width)
    return (ys < h) & (xs < w)


def _autocontrast(x, m, sign, hw):
    n, c, height, width = x.shape
    own = inside(hw, height, width, x.device).expand(n, c, height, width).reshape(n * c, -1)
    flat = x.view(n * c, -1)
    return _autocontrast_with(x, flat.masked_fill(~own, 255).amin(1), flat.masked_fill(~own, 0).amax(1))


def _equalize(x, m, sign, hw):
    n, c, height, width = x.shape
    own = inside(hw, height, width, x.device).expand(n, c, height, width).reshape(n * c, -1)
    index = _channel_index(x)
    counted = index.masked_fill(~own, n * c * 256)  # padding counts in one extra bin
    hist = torch.bincount(counted.view(-1), minlength=n * c * 256 + 1)[:-1].view(n * c, 256)
    return _lookup(_equalize_lut(hist).view(-1), index).view_as(x)


def _contrast(x, m, sign, hw):
    wide = x.to(torch.int32)
    luma = _luma(wide).masked_fill_(~inside(hw, *x.shape[2:], x.device), 0)
    count = torch.from_numpy(hw[:, 0] * hw[:, 1]).to(x.device, torch.float64)
    mean = (luma.sum((1, 2, 3), dtype=torch.float64) / count + 0.5).floor()
    return _contrast_with(x, wide, mean, m, sign)


def _sharpness(x, m, sign, hw):
    height, width = x.shape[2:]
    if height < 3 or width < 3:
        return x
    # The interior of each image: rows 1..h-2 and columns 1..w-2 (none when h or w < 3).
    interior = inside(hw - 1, height - 1, width - 1, x.device)[:, :, 1:, 1:]
    x[:, :, 1:-1, 1:-1] = torch.where(interior, _sharpened_interior(x, m, sign), x[:, :, 1:-1, 1:-1])
    return x


def _remap(x: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor, hw: np.ndarray) -> torch.Tensor:
    """out[i, :, y, x] = x[i, :, iy[i, y, x], ix[i, y, x]], grey where that falls outside image i."""
    n, c, height, width = x.shape
    h, w = (size.view(-1, 1, 1) for size in _sizes(hw, x.device))
    outside = (ix < 0) | (ix >= w) | (iy < 0) | (iy >= h)
    local = (iy.clamp(0, height - 1) * width + ix.clamp(0, width - 1)).masked_fill_(outside, height * width)
    source = torch.cat([x.view(n, c, height * width), x.new_full((n, c, 1), int(GREY))], dim=2)
    return source.gather(2, local.view(n, 1, -1).expand(n, c, -1)).view_as(x)


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows (1, H, 1) and columns (1, 1, W) of a canvas, int64."""
    height, width = x.shape[2:]
    ys = torch.arange(height, device=x.device).view(1, height, 1)
    return ys, torch.arange(width, device=x.device).view(1, 1, width)


def _translate(axis: int):
    """The shift of ops._translate per image: floor(0.5 + m * its own size * sign), grey fill."""

    def op(x, m, sign, hw):
        shift = np.floor(0.5 + m * hw[:, 1 - axis] * sign).astype(np.int64)
        shift = torch.from_numpy(shift).to(x.device).view(-1, 1, 1)
        ys, xs = _grid(x)
        return _remap(x, ys, xs + shift, hw) if axis == 0 else _remap(x, ys + shift, xs, hw)
    return op


def _rotate(x, degrees, sign, hw):
    """ops._rotate about each image's own centre (Pillow's fixed-point matrix of its size)."""
    ix0, iy0, col_per_row, col_per_col, row_per_row, row_per_col = rotate_fixed(degrees, hw[:, 0], hw[:, 1])
    ix0, iy0 = (torch.from_numpy(v).to(x.device).view(-1, 1, 1) for v in (ix0, iy0))
    ys, xs = _grid(x)
    ix = (ix0 + ys * int(col_per_row) + xs * int(col_per_col)) >> 16
    iy = (iy0 + ys * int(row_per_row) + xs * int(row_per_col)) >> 16
    return _remap(x, iy, ix, hw)


def _rot90(x, m, turns, hw):
    """ops._rot90 of each image into the top-left corner (odd turns swap its extent: the chain
    keeps the canvas square for this op)."""
    h, w = (size.view(-1, 1, 1) for size in _sizes(hw, x.device))
    ys, xs = _grid(x)
    turns = int(turns) % 4
    if turns == 1:  # out[y, x] = in[x, w - 1 - y]
        return _remap(x, xs, w - 1 - ys, hw)
    if turns == 2:
        return _remap(x, h - 1 - ys, w - 1 - xs, hw)
    return _remap(x, h - 1 - xs, ys, hw)  # out[y, x] = in[h - 1 - x, y]


def _shear_rows(x: torch.Tensor, shear: float, widths: torch.Tensor) -> torch.Tensor:
    """Pillow's horizontal bicubic shear (AFFINE (1, shear, 0, 0, 1, 0), grey fill) of each row's
    image of width widths[i] ((n, 1, 1, 1)), in float64 with Pillow's own arithmetic (exact)."""
    n, c, height, width = x.shape
    ys = torch.arange(height, device=x.device, dtype=torch.float64).view(height, 1).add_(0.5)
    src = torch.arange(width, device=x.device, dtype=torch.float64).view(1, width).add_(0.5) + ys.mul_(shear)
    pos = src - 0.5
    base = pos.floor()
    d = (pos - base).expand(n, c, height, width)
    base = base.long()
    last = widths - 1
    v1, v2, v3, v4 = (x.gather(3, (base + k).clamp(min=0).minimum(last).expand(n, c, height, width)).double()
                      for k in (-1, 0, 1, 2))  # the tap's column, clamped to each image's own width
    # Pillow's BICUBIC: p1 + d * (p2 + d * (p3 + d * p4)), each product and sum rounded on its own.
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
    p4 = (v2 - v1).add_(v4).sub_(v3)
    value = (p4 * d).add_(p3).mul_(d).add_(v3 - v1).mul_(d).add_(v2)
    value = value.clamp_(0, 255).floor_()
    fill = (src < 0) | (src >= widths)
    return value.masked_fill_(fill, GREY).to(torch.uint8)


def _shear_x(x, m, sign, hw):
    return _shear_rows(x, m * sign, _sizes(hw, x.device)[1])


def _shear_y(x, m, sign, hw):
    """Pillow's arithmetic is symmetric in x and y: the horizontal shear of the transposed images."""
    sheared = _shear_rows(x.transpose(2, 3), m * sign, _sizes(hw, x.device)[0])
    return sheared.transpose(2, 3).contiguous()


def _pointwise(name: str) -> Callable:
    """An op that reads only the pixel it writes: the same-size op runs on the canvas as it is."""
    op = _OPS[name]
    return lambda x, m, sign, hw: op(x, m, sign)


EXTENT_OPS: dict[str, Callable[[torch.Tensor, float, float, np.ndarray], torch.Tensor]] = {
    **{name: _pointwise(name) for name in ("posterize", "solarize", "invert", "brightness", "color")},
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "contrast": _contrast,
    "sharpness": _sharpness,
    "translateX": _translate(0),
    "translateY": _translate(1),
    "rotate": _rotate,
    "shearX": _shear_x,
    "shearY": _shear_y,
    "rot90": _rot90,
}


def apply_op(name: str, x: torch.Tensor, magnitude: float, variant: float,
             hw: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Op `name` on a canvas whose rows hold images of sizes `hw` (None: every image fills the
    canvas): the result and the images' sizes after it (quarter turns swap them)."""
    if hw is None or (hw == x.shape[2:]).all():
        out = _OPS[name](x, magnitude, variant)
    else:
        out = EXTENT_OPS[name](x, magnitude, variant, hw)
    if hw is not None and name == "rot90" and int(variant) % 2:
        hw = hw[:, ::-1].copy()
    return out, hw
