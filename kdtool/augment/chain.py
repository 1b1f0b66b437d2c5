"""JDA policies, their draws and :class:`JointAugment`, which runs a policy's chain on a batch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdtool.augment.extent import apply_op
from kdtool.augment.ops import (
    _CPU_BLOCK_BYTES, _OPS, _gather_rows, _host_rows, _is_identity, _scatter_rows, _variants,
)
from kdtool.errors import KdtoolError, Registry

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


# The authors' magnitude grids (``SubPolicy.ranges`` in liwei-group/CCD data/datasets.py): the
# very float64 values of numpy's linspace, indexed as in their policies.
_GRIDS = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),  # x the image width
    "translateY": np.linspace(0, 150 / 331, 10),  # x the image height
    "rotate": np.linspace(0, 30, 10),  # degrees
    "color": np.linspace(0.0, 0.9, 10),
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),  # bits kept
    "solarize": np.linspace(256, 0, 10),  # threshold
}


def _chain(*ops: tuple[str, int]) -> tuple[Op, ...]:
    """(op, grid index) pairs, as the authors list them -> Ops with the grid's exact magnitude."""
    return tuple(Op(name, float(_GRIDS[name][index]) if name in _GRIDS else 0.0) for name, index in ops)


# PolicyDatasetC100, PolicyDatasetC10 and PolicyDatasetImageNet (the index of an op without a
# magnitude is kept as the authors wrote it; it selects nothing).
_CIFAR100 = _chain(
    ("autocontrast", 2), ("contrast", 3), ("posterize", 0), ("solarize", 4), ("translateY", 8),
    ("shearX", 5), ("brightness", 3), ("shearY", 0), ("translateX", 1), ("sharpness", 5),
    ("invert", 4), ("color", 4), ("equalize", 8), ("rotate", 3),
)
_CIFAR10 = _chain(
    ("invert", 7), ("rotate", 2), ("shearY", 8), ("posterize", 9), ("autocontrast", 8), ("color", 3),
    ("sharpness", 9), ("equalize", 5), ("contrast", 7), ("translateY", 3), ("brightness", 6),
    ("solarize", 2), ("translateX", 3), ("shearX", 8),
)
_IMAGENET = _chain(
    ("posterize", 8), ("solarize", 5), ("equalize", 8), ("posterize", 7), ("equalize", 7),
    ("equalize", 4), ("solarize", 3), ("posterize", 5), ("rotate", 3), ("equalize", 8),
    ("rotate", 8), ("rotate", 9), ("equalize", 7), ("invert", 4), ("color", 4),
    ("rotate", 8), ("color", 8), ("sharpness", 7), ("shearX", 5), ("color", 0),
    ("equalize", 7), ("solarize", 5), ("invert", 4), ("color", 4), ("equalize", 8),
)

POLICIES: Registry[Policy] = Registry("JDA policy", {
    "cifar100": Policy("cifar100", _CIFAR100, 0.3),
    "cifar10": Policy("cifar10", _CIFAR10, 0.5),
    "imagenet": Policy("imagenet", _IMAGENET, 0.2),
    # Not a policy of its own: the CIFAR-100 chain and p under the quickstart's dataset name.
    "digits": Policy("digits", _CIFAR100, 0.3),
    # The paper's 'single rotating' baseline: each view turned by 90, 180 or 270 degrees.
    "rotation": Policy("rotation", (Op("rot90"),), 1.0),
})


# ---------------------------------------------------------------- draws
@dataclass
class JDAParams:
    """The random draws for n samples: which op fires on which sample, and its variant (the
    index into the op's variants: sign -1/+1 for signed ops, 1/2/3 quarter turns for rot90)."""

    fire: torch.Tensor  # bool (n, n_ops)
    variant: torch.Tensor  # int64 (n, n_ops)

    def __len__(self) -> int:
        return self.fire.shape[0]

    def rows(self, index: slice) -> "JDAParams":
        """The draws for a slice of the samples (e.g. this process's share of a global batch)."""
        return JDAParams(self.fire[index], self.variant[index])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SLOTS_PER_VIEW = 256  # counters per view: 3 for crop/flip, then fire and variant per op


def key_uniforms(keys: np.ndarray, view: int, slots: int) -> np.ndarray:
    """float64 (n, slots) in [0, 1): uniforms of SplitMix64 from each key, a pure function of
    (key, view, slot). The loader draws one key per sample from (seed, epoch, index)."""
    if slots > _SLOTS_PER_VIEW:
        raise KdtoolError(f"JDA needs {slots} draws per view, at most {_SLOTS_PER_VIEW}")
    counter = np.arange(view * _SLOTS_PER_VIEW + 1, view * _SLOTS_PER_VIEW + 1 + slots, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as SplitMix64 requires
        z = keys.astype(np.uint64).reshape(-1, 1) + counter * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# ---------------------------------------------------------------- public API
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
        self._variant_counts = [len(_variants(op.name)) for op in policy.ops]

    def __repr__(self) -> str:
        return f"JointAugment({self.policy.name!r}, p={self.p})"

    def params(self, fire_uniforms, variant_uniforms) -> JDAParams:
        """Draws from uniforms in [0, 1) (n, n_ops) (tensors or numpy): fire where u < p, and
        variant floor(u * the op's number of variants)."""
        fire_u, variant_u = torch.as_tensor(fire_uniforms), torch.as_tensor(variant_uniforms)
        counts = torch.tensor(self._variant_counts, device=variant_u.device, dtype=variant_u.dtype)
        return JDAParams(fire_u < self.p, (variant_u * counts).floor_().long())

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> JDAParams:
        """Draw firing masks and variants for n samples from `generator` (on its device;
        torch's default CPU generator when None)."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        shape = (n, len(self.policy.ops))
        drawn = self.params(torch.rand(shape, generator=generator, device=gen_device),
                            torch.rand(shape, generator=generator, device=gen_device))
        return drawn if device is None else JDAParams(drawn.fire.to(device), drawn.variant.to(device))

    def _check(self, images: torch.Tensor, params: JDAParams, dtype_ok: bool, expected: str) -> None:
        if images.ndim != 4 or not dtype_ok or images.shape[1] not in (1, 3):
            raise KdtoolError(f"JDA expects {expected} images (N, C in {{1, 3}}, H, W), got "
                              f"{images.dtype} {tuple(images.shape)}")
        shape = (images.shape[0], len(self.policy.ops))
        if tuple(params.fire.shape) != shape or tuple(params.variant.shape) != shape:
            raise KdtoolError(f"JDA params have shape {tuple(params.fire.shape)}, expected {shape}")

    def _groups(self, fire: np.ndarray, variant: np.ndarray, h: int | None, w: int | None) -> list[tuple]:
        """(op name, magnitude, variant argument, host mask of the rows it runs on), in chain order,
        leaving out what changes nothing (on images of size (h, w); of any size when None)."""
        groups = []
        for k, op in enumerate(self.policy.ops):
            for v, argument in enumerate(_variants(op.name)):
                if not _is_identity(op.name, op.magnitude, argument, h, w):
                    groups.append((op.name, op.magnitude, argument, fire[:, k] & (variant[:, k] == v)))
        return groups

    def _run_chain(self, work: torch.Tensor, fire: np.ndarray, variant: np.ndarray,
                   hw: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
        """The chain on uint8 rows `work` (contiguous, owned: it may be overwritten), with the
        host draws of those rows; with `hw`, rows are a canvas of images of those sizes
        (kdtool.augment.extent). Returns the result (in `work` when the shape is kept) and the
        images' sizes after the chain."""
        groups = self._groups(fire, variant, *((None, None) if hw is not None else work.shape[2:]))
        n = len(work)
        hw = hw.copy() if hw is not None else None
        block = max(1, _CPU_BLOCK_BYTES // work[0].numel()) if work.device.type == "cpu" else n
        for start in range(0, n, block):
            end = min(start + block, n)
            part, part_hw = work[start:end], (hw[start:end] if hw is not None else None)
            for name, magnitude, argument, chosen in groups:
                rows = chosen[start:end]
                if rows.all():
                    part, part_hw = apply_op(name, part, magnitude, argument, part_hw)
                elif rows.any():
                    at = _host_rows(rows, work.device)
                    sub, sub_hw = apply_op(name, _gather_rows(part, at), magnitude, argument,
                                           part_hw[rows] if part_hw is not None else None)
                    _scatter_rows(part, at, sub)
                    if part_hw is not None:
                        part_hw[rows] = sub_hw
            if hw is not None:
                hw[start:end] = part_hw
            if end - start == n:
                return part, hw
            work[start:end] = part
        return work, hw

    def apply_u8(self, images: torch.Tensor, params: JDAParams) -> torch.Tensor:
        """Augment uint8 images (N, C, H, W) with the draws in `params` (N rows): a new tensor."""
        self._check(images, params, images.dtype == torch.uint8, "uint8")
        # One device->host copy of the draws per batch; row indices go back asynchronously.
        fire, variant = params.fire.cpu().numpy(), params.variant.cpu().numpy()
        return self._touched_rows(images.contiguous().clone(), None, fire, variant)[0]

    def apply_canvas(self, canvas: torch.Tensor, hw: np.ndarray, params: JDAParams) -> tuple[torch.Tensor, np.ndarray]:
        """Augment a canvas of images of differing sizes: uint8 (N, C, H, W) whose row i holds an
        image of size hw[i] (int64 (N, 2)) in its top-left corner, each op on each image's own
        pixels (kdtool.augment.extent). A canvas of several images for a policy with quarter turns
        must be square (a single image's canvas may be its own shape).
        Returns a new canvas and the images' sizes after the chain."""
        self._check(canvas, params, canvas.dtype == torch.uint8, "uint8")
        if (any(op.name == "rot90" for op in self.policy.ops) and canvas.shape[2] != canvas.shape[3]
                and len(canvas) > 1):
            raise KdtoolError(f"JDA {self.policy.name!r} turns images by 90 degrees: its canvas must be square, "
                              f"got {tuple(canvas.shape[2:])}")
        fire, variant = params.fire.cpu().numpy(), params.variant.cpu().numpy()
        return self._touched_rows(canvas.contiguous().clone(), np.asarray(hw, dtype=np.int64), fire, variant)

    def _touched_rows(self, out: torch.Tensor, hw: np.ndarray | None, fire: np.ndarray,
                      variant: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
        """The chain on the rows of `out` (owned) on which an op fires; the others stay as they are."""
        touched = fire.any(1)
        if touched.all():
            return self._run_chain(out, fire, variant, hw)
        if touched.any():
            at = _host_rows(touched, out.device)
            done, done_hw = self._run_chain(_gather_rows(out, at), fire[touched], variant[touched],
                                            hw[touched] if hw is not None else None)
            _scatter_rows(out, at, done)
            if hw is not None:
                hw = hw.copy()
                hw[touched] = done_hw
        return out, hw

    def apply(self, images: torch.Tensor, params: JDAParams) -> torch.Tensor:
        """Augment float images in [0, 1] (N, C, H, W): rows on which an op fires are rounded to
        the 1/255 grid, augmented in uint8 and come back as value / 255; other rows are copied."""
        self._check(images, params, images.is_floating_point(), "float")
        touched = params.fire.any(1).to(images.device)
        out = images.clone()
        if bool(touched.any()):
            rows = images[touched].mul(255).round_().clamp_(0, 255).to(torch.uint8)
            out[touched] = self.apply_u8(rows, params.rows(touched.cpu())).to(images.dtype).div_(255)
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample draws for a float batch and apply them."""
        return self.apply(images, self.sample(len(images), generator, device=images.device))


def build_jda(cfg) -> JointAugment | None:
    """The JointAugment a recipe's JDAConfig asks for; None when JDA is off (policy null)."""
    if cfg.policy is None:
        return None
    return JointAugment(cfg.policy, cfg.p)


def joint_batch(images: torch.Tensor, augment: JointAugment | None, views: int,
                params: JDAParams | None) -> torch.Tensor:
    """[originals; view 1 of all B; ...; view V of all B] -> (B * (1 + V), C, H, W), float.

    The chain only, on copies of `images` as they are (no crops: :class:`TrainViews` makes the
    paper's views). `params` covers B * V samples, view-major; None draws them from the default
    generator. `augment` None or `views` 0 -> the originals.
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


# ---------------------------------------------------------------- crops and flips on a batch
def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Per-row torchvision RandomCrop(size=(H, W), padding) + optional horizontal flip, batched.

    Row n is zero-padded by `padding` on each side, cut at (top[n], left[n]) of the padded image
    (offsets in [0, 2 * padding]) and mirrored where flip[n]. uint8 or float, any device.
    """
    n, c, h, w = images.shape
    rows = (top.view(n, 1) + torch.arange(h, device=images.device).view(1, h)).to(images.device)
    cols = torch.arange(w, device=images.device).view(1, w)
    cols = torch.where(flip.view(n, 1).to(images.device), w - 1 - cols, cols) + left.view(n, 1).to(images.device)
    padded = torch.nn.functional.pad(images, (padding,) * 4) if padding else images
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))

