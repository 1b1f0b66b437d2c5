"""What the trainer feeds the models: the joint batch of originals and JDA views."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from kdtool.augment.chain import JointAugment, build_jda, crop_flip, key_uniforms
from kdtool.errors import KdtoolError

# ---------------------------------------------------------------- views for training
@dataclass(frozen=True)
class LoaderViews:
    """The chain run in the loader workers for datasets whose images differ in size: `views`
    chained copies of one full uint8 image (3, H, W), each then cropped by the dataset. Draws come
    from torch's default generator, which SeededSamples seeds per (seed, epoch, index)."""

    augment: JointAugment
    views: int

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        params = self.augment.sample(self.views)
        return [self.augment.apply_u8(image[None], params.rows(slice(v, v + 1)))[0] for v in range(self.views)]


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
    - ``{"views"}``: uint8 (B, 1 + V, C, H, W) made in the loader (:class:`LoaderViews`);
    - a uint8 tensor (B, C, H, W): images used as they are, the chain on copies, draws seeded per
      (seed, step) over the global batch (a dataset of another kind).
    """

    augment: Optional[JointAugment]
    views: int
    seed: int

    @property
    def in_loader(self) -> Optional[LoaderViews]:
        """What a dataset of images of differing sizes runs in its loader workers (None: no views)."""
        return LoaderViews(self.augment, self.views) if self.augment is not None and self.views else None

    def __call__(self, images, step: int, accelerator) -> torch.Tensor:
        device = accelerator.device
        if isinstance(images, dict) and "views" in images:
            return self._from_loader(images["views"].to(device, non_blocking=True))
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
                              f"this dataset makes its views in the loader (SeededSamples(..., in_loader=train_views.in_loader))")
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
    return TrainViews(augment, cfg.views if augment is not None else 0, seed)
