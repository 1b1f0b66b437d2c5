"""RandomResizedCrop + flip of images of differing sizes: the draws, and the resampling batched.

A view of an ImageFolder image is torchvision's RandomResizedCrop (scale (0.08, 1), ratio (3/4,
4/3), ten tries, then the central fallback) drawn from uniforms of the sample's key, the crop
resized to (S, S) with Pillow's BILINEAR arithmetic (``Image.crop(box).resize((S, S),
BILINEAR)``: an antialiased triangle filter whose support grows with the reduction, fixed-point
8-bit sums, each pass rounded to uint8), then mirrored when its flip uniform is < 0.5.

:func:`crop_resize` computes those integer sums for a batch of crops of different sizes at once,
on any device; the loader path (:func:`crop_resize_pil`) has Pillow make the same two passes
one after the other, so both paths give the same pixels. Each pass is Pillow's own
(``src/libImaging/Resample.c``: precompute_coeffs, normalize_coeffs_8bpc,
ResampleHorizontal_8bpc / ResampleVertical_8bpc); the passes run
horizontal first, Pillow's order up to 12.x. (Pillow 13 runs the vertical pass first for some
shapes, python-pillow/Pillow#9549; a pixel may then differ from Pillow's by one level.)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

CROP_TRIES = 10
CROP_SLOTS = 4 * CROP_TRIES  # uniforms per view: (area, log-ratio, top, left) per try
_SCALE = (0.08, 1.0)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_PRECISION_BITS = 22  # Pillow's 32 - 8 - 2


def crop_boxes(u: np.ndarray, height, width) -> np.ndarray:
    """RandomResizedCrop's (top, left, crop height, crop width) per row, int64 (n, 4), from
    CROP_SLOTS uniforms per row (n, CROP_SLOTS) and each image's height and width (n,): the first
    of the ten tries that fits, else torchvision's central fallback."""
    height = np.asarray(height, dtype=np.int64)[:, None]
    width = np.asarray(width, dtype=np.int64)[:, None]
    tries = u.reshape(len(u), CROP_TRIES, 4)
    target = (height * width) * (_SCALE[0] + tries[:, :, 0] * (_SCALE[1] - _SCALE[0]))
    aspect = np.exp(_LOG_RATIO[0] + tries[:, :, 1] * (_LOG_RATIO[1] - _LOG_RATIO[0]))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = np.floor(tries[:, :, 2] * (height - h + 1)).astype(np.int64)
    left = np.floor(tries[:, :, 3] * (width - w + 1)).astype(np.int64)
    first = fits.argmax(1)[:, None]
    box = np.concatenate([np.take_along_axis(v, first, 1) for v in (top, left, h, w)], axis=1)
    # torchvision's fallback: the central crop of the allowed ratio closest to the image's.
    ratio = width / height
    w = np.where(ratio > 4 / 3, np.round(height * (4 / 3)), width).astype(np.int64)
    h = np.where(ratio < 3 / 4, np.round(width / (3 / 4)), height).astype(np.int64)
    fallback = np.concatenate([(height - h) // 2, (width - w) // 2, h, w], axis=1)
    return np.where(fits.any(1)[:, None], box, fallback)


def crop_resize_pil(image: Image.Image, box, size: int, flip: bool) -> torch.Tensor:
    """The per-image path: Pillow crops (top, left, height, width), resizes the width then the
    height to `size` (BILINEAR, one pass per call) and mirrors when `flip`: uint8 (C, size, size)."""
    top, left, h, w = (int(v) for v in box)
    across = image.crop((left, top, left + w, top + h)).resize((size, h), Image.BILINEAR)  # horizontal pass only
    out = across.resize((size, size), Image.BILINEAR)  # vertical pass only
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.stack([np.asarray(plane) for plane in out.split()]))


def _coefficients(in_size: np.ndarray, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point BILINEAR coefficients for resizing spans of `in_size` (n,) to
    `out_size`: int32 weights (n, out_size, K) and the first input index (n, out_size), K the
    largest tap count; taps beyond a span's own count weigh 0."""
    scale = in_size.astype(np.float64) / out_size
    filterscale = np.maximum(scale, 1.0)
    support = filterscale  # the triangle's support 1.0, scaled
    taps = int(np.ceil(support).max()) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64)[None, :] + 0.5) * scale[:, None]
    ss = (1.0 / filterscale)[:, None]
    xmin = np.maximum(np.trunc(center - support[:, None] + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support[:, None] + 0.5), in_size[:, None]).astype(np.int64) - xmin
    weights = np.zeros((len(in_size), out_size, taps), dtype=np.float64)
    total = np.zeros_like(center)
    for t in range(taps):  # in tap order: Pillow sums the weights one by one
        x = np.abs(((t + xmin) - center + 0.5) * ss)
        w = np.where((t < xmax) & (x < 1.0), 1.0 - x, 0.0)
        weights[:, :, t] = w
        total = total + w
    weights = np.where(total[:, :, None] != 0, weights / np.where(total == 0, 1.0, total)[:, :, None], weights)
    return np.trunc(0.5 + weights * (1 << _PRECISION_BITS)).astype(np.int32), xmin


def _resample_pass(x: torch.Tensor, dim: int, weights: np.ndarray, first: np.ndarray,
                   offset: np.ndarray) -> torch.Tensor:
    """One pass of Pillow's 8-bit resampling along `dim` (2 rows, 3 columns) of uint8 x (n, C, H, W):
    output i of row r sums x[offset[r] + first[r, i] + t] * weights[r, i, t] over the taps t."""
    n, c = x.shape[:2]
    out_size, taps = weights.shape[1:]
    device = x.device
    start = torch.from_numpy(offset[:, None] + first).to(device)  # (n, out)
    kernel = torch.from_numpy(weights).to(device)  # (n, out, K)
    shape = [n, c, x.shape[2], x.shape[3]]
    shape[dim] = out_size
    view = [n, 1, 1, 1]
    view[dim] = out_size
    acc = torch.full(shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=device)
    for t in range(taps):
        index = (start + t).clamp_(max=x.shape[dim] - 1).view(view).expand(shape)
        acc += x.gather(dim, index).to(torch.int32) * kernel[:, :, t].reshape(view)
    return acc.bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def crop_resize(canvas: torch.Tensor, boxes: np.ndarray, size: int, flips: np.ndarray) -> torch.Tensor:
    """The accelerator path: for each row of a uint8 canvas (N, C, H, W), the crop boxes[i] =
    (top, left, height, width) resized to (size, size) with Pillow's BILINEAR arithmetic (exact
    integer sums, so equal to :func:`crop_resize_pil` on any device), mirrored where flips[i]."""
    top, left, h, w = (boxes[:, k] for k in range(4))
    # Only the rows a crop reads: gather them first, then the horizontal pass on those rows.
    rows = int(h.max())
    wx, x0 = _coefficients(w, size)
    wy, y0 = _coefficients(h, size)
    n, c, height, width = canvas.shape
    row_index = torch.from_numpy(top[:, None] + np.arange(rows)[None, :]).to(canvas.device)
    band = canvas.gather(2, row_index.clamp_(max=height - 1).view(n, 1, rows, 1).expand(n, c, rows, width))
    across = _resample_pass(band, 3, wx, x0, left)
    out = _resample_pass(across, 2, wy, y0, np.zeros_like(top))
    flip = torch.from_numpy(np.asarray(flips, dtype=bool)).to(canvas.device).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(3), out)
