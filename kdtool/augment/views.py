"""What the trainer feeds the models: the joint batch of originals and JDA views."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch

from PIL import Image

from kdtool.augment.chain import _SLOTS_PER_VIEW, JointAugment, build_jda, crop_flip, key_uniforms
from kdtool.augment.resample import CROP_SLOTS, crop_boxes, crop_resize, crop_resize_pil
from kdtool.data import MAX_IMAGE_PIXELS, decode_fallback, decode_on_device
from kdtool.errors import KdtoolError

# ---------------------------------------------------------------- views for training
VIEW_DEVICES = ("auto", "loader", "accelerator")
_CROP_FIRST_SLOT = _SLOTS_PER_VIEW - CROP_SLOTS  # a view's RandomResizedCrop draws: its last slots


def view_device(setting: str, device_type: str) -> tuple[str, str]:
    """Where the views of images of differing sizes are made ("loader" or "accelerator") for
    the recipe's `augment.jda.device` on a run whose accelerator is `device_type`, and why."""
    if setting not in VIEW_DEVICES:
        raise KdtoolError(f"augment.jda.device: {setting!r} is not one of {', '.join(VIEW_DEVICES)}")
    if setting != "auto":
        return setting, f"augment.jda.device: {setting}"
    if device_type == "cuda":
        return "accelerator", "auto: training runs on CUDA, the loader workers only read and decode"
    return "loader", f"auto: training runs on {device_type}, where the loader workers make them"


def _view_uniforms(keys: np.ndarray, view: int) -> np.ndarray:
    """All of a view's uniforms (n, slots): crop/flip in 0..2, the chain's from 3, the
    RandomResizedCrop tries in the last CROP_SLOTS."""
    return key_uniforms(keys, view, _SLOTS_PER_VIEW)


def chain_params(augment: JointAugment, u: np.ndarray):
    """The chain's draws (JDAParams) from a view's uniforms (n, slots)."""
    n_ops = len(augment.policy.ops)
    if 3 + 2 * n_ops > _CROP_FIRST_SLOT:
        raise KdtoolError(f"JDA policy {augment.policy.name!r} has {n_ops} ops; views of images of differing "
                          f"sizes take at most {(_CROP_FIRST_SLOT - 3) // 2}")
    return augment.params(u[:, 3:3 + n_ops], u[:, 3 + n_ops:3 + 2 * n_ops])


@dataclass(frozen=True)
class LoaderViews:
    """The per-image path for datasets whose images differ in size, run in the loader workers:
    the original and `views` chained copies of one decoded image, each then RandomResizedCrop +
    flip to (size, size) with Pillow (kdtool.augment.resample), all drawn from the sample's key.
    Returns uint8 (1 + views, C, size, size); the accelerator path makes the same pixels."""

    augment: Optional[JointAugment]
    views: int

    def __call__(self, image: Image.Image, key: int, size: int) -> torch.Tensor:
        keys = np.array([key], dtype=np.int64)
        uniforms = np.concatenate([_view_uniforms(keys, view) for view in range(1 + self.views)])
        params = [chain_params(self.augment, u[None]) for u in uniforms[1:]]
        # A view on which no op fires is the image itself (p 0: the two-view baseline).
        full = (torch.from_numpy(np.stack([np.asarray(plane) for plane in image.split()]))  # (C, H, W)
                if any(bool(p.fire.any()) for p in params) else None)
        pictures = [image] + [_planes_to_pil(self.augment.apply_u8(full[None], p)[0]) if bool(p.fire.any()) else image
                              for p in params]
        boxes = crop_boxes(uniforms[:, _CROP_FIRST_SLOT:], [p.height for p in pictures], [p.width for p in pictures])
        return torch.stack([crop_resize_pil(picture, box, size, bool(u[2] < 0.5))
                            for picture, box, u in zip(pictures, boxes, uniforms)])


def _planes_to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> a PIL image, merged from its planes (no strided HWC copy)."""
    c, h, w = image.shape
    planes = [Image.frombuffer("L", (w, h), plane.contiguous().numpy(), "raw", "L", 0, 1) for plane in image]
    return planes[0].copy() if c == 1 else Image.merge("RGB", planes)


def _chunks(hw: np.ndarray, square: bool) -> list[tuple[int, int]]:
    """Consecutive row ranges whose canvas (rows x tallest x widest) holds at most
    MAX_IMAGE_PIXELS pixels (a single image always fits: the loader refuses larger ones)."""
    ranges, start, tall, wide = [], 0, 0, 0
    for i, (h, w) in enumerate(hw):
        tall, wide = max(tall, h), max(wide, w)
        if square:
            tall = wide = max(tall, wide)
        if i > start and (i + 1 - start) * tall * wide > MAX_IMAGE_PIXELS:
            ranges.append((start, i))
            start, tall, wide = i, (max(h, w) if square else h), (max(h, w) if square else w)
    ranges.append((start, len(hw)))
    return ranges


def _canvas(pixels: torch.Tensor, hw: np.ndarray, square: bool) -> torch.Tensor:
    """Packed HWC images (their pixels one after the other) -> a uint8 canvas (n, C, H, W) with
    each image in the top-left corner of its row (padding 0)."""
    tall, wide = int(hw[:, 0].max()), int(hw[:, 1].max())
    if square:
        tall = wide = max(tall, wide)
    n, c = len(hw), 3
    rows = torch.arange(tall, device=pixels.device).view(1, tall, 1)
    cols = torch.arange(wide * c, device=pixels.device).view(1, 1, wide * c)
    sizes = torch.from_numpy(hw).to(pixels.device)
    own = (rows < sizes[:, 0].view(n, 1, 1)) & (cols < sizes[:, 1].view(n, 1, 1) * c)
    canvas = torch.zeros(n, tall, wide * c, dtype=torch.uint8, device=pixels.device)
    canvas.masked_scatter_(own, pixels)  # row-major order: the packed order of the images
    return canvas.view(n, tall, wide, c).permute(0, 3, 1, 2).contiguous()


def differing_size_views(pixels: torch.Tensor, hw: np.ndarray, keys: np.ndarray, augment: Optional[JointAugment],
                         views: int, size: int) -> torch.Tensor:
    """The accelerator path: uint8 (B * (1 + views), C, size, size), laid out [originals; view 1; ...],
    from B decoded images of sizes hw (int64 (B, 2)) packed HWC one after the other in `pixels`
    (on the accelerator's device), with the same draws and pixels as :class:`LoaderViews`. The
    images go through the chain and the crops on canvases of at most MAX_IMAGE_PIXELS pixels."""
    b = len(hw)
    square = augment is not None and any(op.name == "rot90" for op in augment.policy.ops)
    uniforms = [_view_uniforms(keys, view) for view in range(1 + views)]
    params = [chain_params(augment, u) for u in uniforms[1:]] if views else []
    out = torch.empty(b * (1 + views), 3, size, size, dtype=torch.uint8, device=pixels.device)
    offsets = np.concatenate([[0], np.cumsum(hw[:, 0] * hw[:, 1] * 3)])
    for start, end in _chunks(hw, square):
        # One image alone needs no square canvas: quarter turns may change its shape.
        canvas = _canvas(pixels[int(offsets[start]):int(offsets[end])], hw[start:end], square and end - start > 1)
        for view, u in enumerate(uniforms):
            made, made_hw = canvas, hw[start:end]
            if view:
                made, made_hw = augment.apply_canvas(canvas, made_hw, params[view - 1].rows(slice(start, end)))
            boxes = crop_boxes(u[start:end, _CROP_FIRST_SLOT:], made_hw[:, 0], made_hw[:, 1])
            out[view * b + start:view * b + end] = crop_resize(made, boxes, size, u[start:end, 2] < 0.5)
    return out


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for one step's draws, a pure function of (seed, step)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63))
    return generator


@dataclass
class TrainViews:
    """Turns what the training loader yields into the joint batch the trainer feeds the models.

    The trainer treats a loader batch's first element as opaque and calls this with it; the
    result is float [0, 1] images on the accelerator's device, laid out ``[originals; view 1; ...]``
    (not yet normalised). ``views`` is 0 without JDA. The batch is one of (kdtool.data):

    - ``{"image", "key", "padding", "flip"}``: uncropped uint8 images of one size, one random key
      per sample, the dataset's crop padding and whether it flips: chain, crops and flips here;
    - ``{"pixels", "extent", "key", "size"}``: decoded images of differing sizes packed HWC one
      after the other, their (height, width), one random key per sample and the training size:
      chain, RandomResizedCrop and flips here (:func:`differing_size_views`); with ``data.decode:
      accelerator`` some come as JPEG bytes ("encoded", ...), decoded here first
      (kdtool.data.decode_on_device, files it cannot decode through `fallback`, see `reading`);
    - ``{"views"}``: uint8 (B, 1 + V, C, H, W) made in the loader (:class:`LoaderViews`);
    - a uint8 tensor (B, C, H, W): images used as they are, the chain on copies, draws seeded per
      (seed, step) over the global batch (a dataset of another kind).
    """

    augment: Optional[JointAugment]
    views: int
    seed: int
    where: str = "auto"  # augment.jda.device: where views of images of differing sizes are made
    fallback: Optional[Callable] = None  # decodes on the CPU a JPEG the accelerator could not

    def reading(self, dataset) -> "TrainViews":
        """These views for batches of `dataset`: JPEGs the accelerator cannot decode go to its CPU decoder."""
        return replace(self, fallback=decode_fallback(dataset))

    def loader_views(self, device: torch.device) -> Optional[LoaderViews]:
        """What a dataset of images of differing sizes runs in its loader workers when training
        on `device`: the per-image path, or None when the views are made on the accelerator."""
        if view_device(self.where, torch.device(device).type)[0] == "accelerator":
            return None
        return LoaderViews(self.augment, self.views if self.augment is not None else 0)

    def __call__(self, images, step: int, accelerator) -> torch.Tensor:
        device = accelerator.device
        if isinstance(images, dict) and "views" in images:
            return self._from_loader(images["views"].to(device, non_blocking=True))
        if isinstance(images, dict) and "pixels" in images:
            # Accelerate may have moved the whole batch to the device already: sizes and keys back to the host.
            made = differing_size_views(decode_on_device(images, device, self.fallback), images["extent"].cpu().numpy(),
                                        images["key"].cpu().numpy(), self.augment, self.views,
                                        _one_value(images["size"], "size"))
            return made.float().div_(255)
        if isinstance(images, dict):
            batch, keys = images["image"].to(device, non_blocking=True), images["key"].cpu().numpy()
            padding, flips = _one_value(images["padding"], "padding"), bool(_one_value(images["flip"], "flip"))
        else:
            batch, padding, flips = images.to(device, non_blocking=True), 0, False
            world, rank = accelerator.num_processes, accelerator.process_index
            drawn = torch.randint(0, 2**62, (world * len(batch),), generator=step_generator(self.seed, step, torch.device("cpu")))
            keys = drawn.view(world, len(batch))[rank].numpy()
        return self._batched(batch, keys, padding, flips)

    def _from_loader(self, stacked: torch.Tensor) -> torch.Tensor:
        made = stacked.shape[1] - 1
        if made < self.views:
            raise KdtoolError(f"the training loader made {made} JDA view(s) per image, {self.views} asked: "
                              f"this dataset makes its views in the loader (SeededSamples(..., in_loader=train_views.loader_views(device)))")
        joint = stacked[:, :1 + self.views].transpose(0, 1).reshape(-1, *stacked.shape[2:])
        return joint.float().div_(255)

    def _batched(self, batch: torch.Tensor, keys: np.ndarray, padding: int, flips: bool) -> torch.Tensor:
        n_ops = len(self.augment.policy.ops) if self.views else 0
        parts, top, left, flip = [batch], [], [], []
        for view in range(1 + self.views):
            u = key_uniforms(keys, view, 3 + 2 * n_ops)
            top.append(np.floor(u[:, 0] * (2 * padding + 1)))
            left.append(np.floor(u[:, 1] * (2 * padding + 1)))
            flip.append((u[:, 2] < 0.5) & flips)
            if view:
                params = self.augment.params(u[:, 3:3 + n_ops], u[:, 3 + n_ops:])
                parts.append(self.augment.apply_u8(batch, params))
        as_tensor = lambda values: torch.from_numpy(np.concatenate(values)).to(batch.device, non_blocking=True)  # noqa: E731
        joint = torch.cat(parts) if self.views else batch
        cropped = crop_flip(joint, as_tensor(top).long(), as_tensor(left).long(), as_tensor(flip), padding)
        return cropped.float().div_(255)


def _one_value(values: torch.Tensor, name: str) -> int:
    """The single value a per-sample field of a batch holds (the dataset's padding or flip)."""
    first = int(values.view(-1)[0])
    if bool((values != first).any()):
        raise KdtoolError(f"a training batch mixes samples of different '{name}' (one dataset per loader)")
    return first


def build_train_views(cfg, seed: int) -> TrainViews:
    """The TrainViews for a recipe's JDAConfig (`views` 0 when JDA is off)."""
    augment = build_jda(cfg)
    return TrainViews(augment, cfg.views if augment is not None else 0, seed, cfg.device)
