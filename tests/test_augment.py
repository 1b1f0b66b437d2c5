"""JDA ops against Pillow, firing statistics, determinism and the joint batch layout.

Every op is compared on the 0..255 scale with the Pillow call the reference implementation
makes (ImageOps / ImageEnhance / Image.transform AFFINE with grey fill / rotate composited on
grey), on digits upsampled to 32x32 RGB and on smooth synthetic 64x64 colour images.
Tolerances (all measured in grey levels; on the CPU every op currently matches exactly):
  exact LUT ops (autocontrast, equalize, invert, posterize, solarize):  max |diff| <= 1,
      mean <= 0.01
  geometric ops (translateX/Y, rotate, shearX/Y) and enhance ops (contrast, brightness,
  sharpness, color):  mean |diff| <= 0.05 and share of pixels off by > 2 levels <= 0.1 %
The negative controls check that a wrong sign or rotation direction breaks these tolerances.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from kdtool.augment import (
    POLICIES, JDAParams, JointAugment, Op, Policy, build_jda, joint_batch,
)
from kdtool.augment import ops as ops_module

SIGN_VARIANT = {-1.0: 0, 1.0: 1}  # JDAParams.variant of a signed op
from kdtool.errors import KdtoolError
from kdtool.recipe import JDAConfig

GREY = (128, 128, 128)
EXACT_OPS = {"autocontrast", "equalize", "invert", "posterize", "solarize"}
SIGNED_OPS = {"contrast", "brightness", "sharpness", "color", "shearX", "shearY",
              "translateX", "translateY"}


# ---------------------------------------------------------------- images
def _digits_u8(n: int = 12) -> torch.Tensor:
    from sklearn.datasets import load_digits

    d = torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32)[:, None]
    d = torch.nn.functional.interpolate(d, size=32, mode="bilinear", align_corners=False)
    scales = torch.tensor([[1.0, 0.8, 0.55], [0.5, 1.0, 0.7], [0.9, 0.4, 1.0]])
    rgb = d * scales[torch.arange(n) % 3].view(n, 3, 1, 1) + torch.tensor([0.0, 0.05, 0.1]).view(1, 3, 1, 1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)


def _synthetic_u8(n: int = 3, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for k in range(n):
        img = torch.stack([0.2 + 0.6 * xx * (1 - 0.2 * k), 0.1 + 0.7 * yy,
                           0.5 + 0.4 * torch.sin(6.28 * (xx + yy) * (1 + k))])
        disc = (xx - 0.3 - 0.1 * k) ** 2 + (yy - 0.6) ** 2 < 0.04
        img[:, disc] = torch.tensor([0.9, 0.2 + 0.1 * k, 0.1]).view(3, 1)
        square = (xx > 0.55) & (xx < 0.85) & (yy > 0.1) & (yy < 0.4)
        img[:, square] = torch.tensor([0.1, 0.3, 0.8]).view(3, 1)
        images.append(img)
    return (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8)


IMAGES = {"digits32": _digits_u8(), "synthetic64": _synthetic_u8()}


# ---------------------------------------------------------------- Pillow reference
def _pil_op(img: Image.Image, name: str, m: float, sign: float) -> Image.Image:
    """The reference implementation's op, with the random sign fixed."""
    factor = 1 + m * sign
    fill = GREY if img.mode == "RGB" else 128
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "invert":
        return ImageOps.invert(img)
    if name == "posterize":
        return ImageOps.posterize(img, int(m))
    if name == "solarize":
        return ImageOps.solarize(img, m)
    if name == "contrast":
        return ImageEnhance.Contrast(img).enhance(factor)
    if name == "brightness":
        return ImageEnhance.Brightness(img).enhance(factor)
    if name == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(factor)
    if name == "color":
        return ImageEnhance.Color(img).enhance(factor)
    if name == "shearX":
        return img.transform(img.size, Image.AFFINE, (1, m * sign, 0, 0, 1, 0), Image.BICUBIC, fillcolor=fill)
    if name == "shearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, m * sign, 1, 0), Image.BICUBIC, fillcolor=fill)
    if name == "translateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, m * img.size[0] * sign, 0, 1, 0), fillcolor=fill)
    if name == "translateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, m * img.size[1] * sign), fillcolor=fill)
    if name == "rotate":
        rot = img.convert("RGBA").rotate(m)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)
    if name == "rot90":  # `sign` holds the quarter turns (counter-clockwise)
        return img.transpose({1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
                              3: Image.Transpose.ROTATE_270}[int(sign)])
    raise AssertionError(name)


def _to_pil(u8: torch.Tensor) -> Image.Image:
    arr = u8.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _from_pil(img: Image.Image) -> torch.Tensor:
    arr = np.array(img)
    return torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1).float()


def _ours(u8: torch.Tensor, name: str, m: float, sign: float) -> torch.Tensor:
    aug = JointAugment(Policy("one", (Op(name, m),), 1.0))
    n = len(u8)
    variant = SIGN_VARIANT[sign] if name in SIGNED_OPS else int(sign) - 1 if name == "rot90" else 0
    params = JDAParams(torch.ones(n, 1, dtype=torch.bool), torch.full((n, 1), variant))
    return (aug.apply(u8.float() / 255, params) * 255).round()


def _within_tolerance(name: str, ours: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    diff = (ours - ref).abs()
    mean, far, worst = diff.mean().item(), (diff > 2).float().mean().item(), diff.max().item()
    stats = f"mean {mean:.4f}, >2 levels {far:.4%}, max {worst:.0f}"
    if name in EXACT_OPS:
        return worst <= 1 and mean <= 0.01, stats
    return mean <= 0.05 and far <= 0.001, stats


OP_CASES = [
    ("autocontrast", 0), ("equalize", 0), ("invert", 0), ("posterize", 4), ("posterize", 6),
    ("solarize", 142), ("solarize", 114), ("contrast", 0.3), ("contrast", 0.7),
    ("brightness", 0.3), ("brightness", 0.6), ("sharpness", 0.5), ("sharpness", 0.9),
    ("color", 0.4), ("color", 0.8), ("shearX", 0.17), ("shearX", 0.27), ("shearY", 0.27),
    ("shearY", 0.0), ("translateX", 0.05), ("translateX", 0.15), ("translateY", 0.40),
    ("translateY", 0.15), ("rotate", 10.0), ("rotate", 26.7), ("rotate", 6.7),
    # the authors' exact grid values
    ("shearX", 1 / 6), ("shearY", 0.3 * 8 / 9), ("translateY", 150 / 331 * 8 / 9), ("translateX", 150 / 331 / 9),
    ("rotate", 20 / 3), ("rotate", 80 / 3), ("solarize", 256 - 256 * 4 / 9), ("solarize", 256 - 256 * 2 / 9),
]


@pytest.mark.parametrize("images", sorted(IMAGES))
@pytest.mark.parametrize("name,m", OP_CASES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_op_matches_pillow(images, name, m, sign):
    u8 = IMAGES[images]
    ref = torch.stack([_from_pil(_pil_op(_to_pil(im), name, m, sign)) for im in u8])
    ok, stats = _within_tolerance(name, _ours(u8, name, m, sign), ref)
    assert ok, f"{name} {m} sign {sign} on {images}: {stats}"


@pytest.mark.parametrize("name,m", [(n, m) for n, m in OP_CASES if n in SIGNED_OPS and m > 0]
                         + [("rotate", 10.0), ("rotate", 6.7)])
def test_wrong_sign_or_direction_breaks_tolerance(name, m):
    """Negative control: the tolerances tell a flipped sign / rotation direction apart."""
    u8 = IMAGES["synthetic64"]
    ref = torch.stack([_from_pil(_pil_op(_to_pil(im), name, m, 1.0)) for im in u8])
    wrong = _ours(u8, name, -m, 1.0) if name == "rotate" else _ours(u8, name, m, -1.0)
    ok, stats = _within_tolerance(name, wrong, ref)
    assert not ok, f"flipped {name} still within tolerance: {stats}"


def test_wrong_luma_weights_break_tolerance():
    """Negative control: colour with an unweighted channel mean as grey is caught."""
    u8 = IMAGES["synthetic64"]
    ref = torch.stack([_from_pil(_pil_op(_to_pil(im), "color", 0.8, -1.0)) for im in u8])
    x = u8.float()
    wrong = (x.mean(1, keepdim=True) + 0.2 * (x - x.mean(1, keepdim=True))).floor()
    assert not _within_tolerance("color", wrong, ref)[0]


@pytest.mark.parametrize("name,m", [("autocontrast", 0), ("equalize", 0), ("contrast", 0.3),
                                    ("brightness", 0.6), ("sharpness", 0.5), ("color", 0.4),
                                    ("shearX", 0.17), ("translateY", 0.4), ("rotate", 10.0)])
def test_grayscale_matches_pillow_l_mode(name, m):
    u8 = IMAGES["digits32"][:, :1]
    ref = torch.stack([_from_pil(_pil_op(_to_pil(im), name, m, -1.0)) for im in u8])
    ok, stats = _within_tolerance(name, _ours(u8, name, m, -1.0), ref)
    assert ok, f"{name} on L images: {stats}"


def _argument(name: str, variant: int) -> float:
    """What _pil_op takes for a drawn variant: the sign of a signed op, the quarter turns of rot90."""
    if name in SIGNED_OPS:
        return (-1.0, 1.0)[variant]
    return variant + 1.0 if name == "rot90" else 1.0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_chain_matches_pillow_chain(policy):
    """A whole chain with mixed draws equals the reference's per-image Pillow chain."""
    aug = JointAugment(policy, p=0.5)
    u8 = torch.cat([IMAGES["digits32"]] * 2)
    params = aug.sample(len(u8), torch.Generator().manual_seed(3))
    ours = (aug.apply(u8.float() / 255, params) * 255).round()
    for i, im in enumerate(u8):
        img = _to_pil(im)
        for k, op in enumerate(aug.policy.ops):
            if params.fire[i, k]:
                img = _pil_op(img, op.name, op.magnitude, _argument(op.name, int(params.variant[i, k])))
        diff = (ours[i] - _from_pil(img)).abs()
        assert diff.mean() <= 0.05 and (diff > 2).float().mean() <= 0.001, (policy, i)


# ---------------------------------------------------------------- behaviour
def _float_images(n=6, c=3, size=16, seed=0):
    # Deliberately off the 1/255 grid: untouched rows must still come back bit-exactly.
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_p0_returns_originals_exactly(policy):
    images = _float_images()
    out = JointAugment(policy, p=0.0)(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, images)


def test_rows_where_nothing_fires_are_unchanged_and_input_is_not_modified():
    aug = JointAugment("cifar100", p=0.05)
    images = _float_images(n=64)
    before = images.clone()
    params = aug.sample(64, torch.Generator().manual_seed(2))
    out = aug.apply(images, params)
    assert torch.equal(images, before)
    idle = ~params.fire.any(1)
    assert 0 < idle.sum() < 64
    assert torch.equal(out[idle], images[idle])
    busy = out[~idle]
    assert busy.min() >= 0 and busy.max() <= 1
    assert torch.allclose(busy * 255, (busy * 255).round(), atol=1e-3)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.8])
def test_firing_rate_and_signs(p):
    n = 20000
    params = JointAugment("cifar10", p=p).sample(n, torch.Generator().manual_seed(int(p * 10)))
    assert params.fire.dtype == torch.bool and params.fire.shape == (n, 14)
    se = math.sqrt(p * (1 - p) / n)
    rates = params.fire.float().mean(0)
    assert ((rates - p).abs() <= 4 * se).all(), rates
    signed = torch.tensor([op.name in SIGNED_OPS for op in POLICIES["cifar10"].ops])
    assert set(params.variant[:, signed].unique().tolist()) == {0, 1} and (params.variant[:, ~signed] == 0).all()
    positive = (params.variant[:, signed] == SIGN_VARIANT[1.0]).float().mean(0)
    assert ((positive - 0.5).abs() <= 4 * math.sqrt(0.25 / n)).all(), positive


# The authors' policies as (op, grid index) (liwei-group/CCD data/datasets.py) and their grids.
AUTHORS = {
    "cifar100": ([("autocontrast", 2), ("contrast", 3), ("posterize", 0), ("solarize", 4), ("translateY", 8),
                  ("shearX", 5), ("brightness", 3), ("shearY", 0), ("translateX", 1), ("sharpness", 5),
                  ("invert", 4), ("color", 4), ("equalize", 8), ("rotate", 3)], 0.3),
    "cifar10": ([("invert", 7), ("rotate", 2), ("shearY", 8), ("posterize", 9), ("autocontrast", 8), ("color", 3),
                 ("sharpness", 9), ("equalize", 5), ("contrast", 7), ("translateY", 3), ("brightness", 6),
                 ("solarize", 2), ("translateX", 3), ("shearX", 8)], 0.5),
    "imagenet": ([("posterize", 8), ("solarize", 5), ("equalize", 8), ("posterize", 7), ("equalize", 7),
                  ("equalize", 4), ("solarize", 3), ("posterize", 5), ("rotate", 3), ("equalize", 8),
                  ("rotate", 8), ("rotate", 9), ("equalize", 7), ("invert", 4), ("color", 4),
                  ("rotate", 8), ("color", 8), ("sharpness", 7), ("shearX", 5), ("color", 0),
                  ("equalize", 7), ("solarize", 5), ("invert", 4), ("color", 4), ("equalize", 8)], 0.2),
}
AUTHORS_GRIDS = {
    **dict.fromkeys(["shearX", "shearY"], np.linspace(0, 0.3, 10)),
    **dict.fromkeys(["translateX", "translateY"], np.linspace(0, 150 / 331, 10)),
    "rotate": np.linspace(0, 30, 10),
    **dict.fromkeys(["color", "contrast", "sharpness", "brightness"], np.linspace(0.0, 0.9, 10)),
    "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
    "solarize": np.linspace(256, 0, 10),
    **dict.fromkeys(["autocontrast", "equalize", "invert"], [0] * 10),
}


@pytest.mark.parametrize("policy", sorted(AUTHORS))
def test_policies_are_the_authors_with_exact_magnitudes(policy):
    chain, p = AUTHORS[policy]
    assert POLICIES[policy].p == p
    assert [(op.name, op.magnitude) for op in POLICIES[policy].ops] == [
        (name, float(AUTHORS_GRIDS[name][index])) for name, index in chain]


def test_exact_magnitudes_in_design_examples():
    ops = {op.name: op.magnitude for op in POLICIES["cifar100"].ops}
    assert ops["shearX"] == 0.3 * 5 / 9 and ops["solarize"] == pytest.approx(142.2, abs=0.05)
    assert ops["translateY"] == pytest.approx(0.4028, abs=1e-4) and ops["translateX"] == pytest.approx(0.0504, abs=1e-4)
    assert ops["rotate"] == 10.0 and ops["posterize"] == 8  # index 0 of the posterize grid keeps 8 bits
    rotations = [op.magnitude for op in POLICIES["imagenet"].ops if op.name == "rotate"]
    assert rotations == [10.0, 80 / 3, 30.0, 80 / 3]


def test_digits_is_the_cifar100_chain_and_rotation_turns_every_view():
    assert POLICIES["digits"].ops == POLICIES["cifar100"].ops and POLICIES["digits"].p == POLICIES["cifar100"].p
    assert POLICIES["rotation"].ops == (Op("rot90"),) and POLICIES["rotation"].p == 1.0
    params = JointAugment("rotation").sample(30000, torch.Generator().manual_seed(0))
    assert params.fire.all()
    turns = torch.bincount(params.variant.view(-1), minlength=3).float() / 30000
    assert len(turns) == 3 and ((turns - 1 / 3).abs() < 4 * math.sqrt(2 / 9 / 30000)).all(), turns


def test_joint_batch_layout_and_row_slicing():
    aug = JointAugment("cifar100", p=0.6)
    images = (_float_images(n=5, size=32) * 255).round() / 255
    views = 3
    params = aug.sample(5 * views, torch.Generator().manual_seed(4))
    batch = joint_batch(images, aug, views, params)
    assert batch.shape == (5 * (1 + views), 3, 32, 32)
    assert torch.equal(batch[:5], images)
    for v in range(views):
        view_params = params.rows(slice(v * 5, (v + 1) * 5))
        assert torch.equal(batch[5 * (1 + v):5 * (2 + v)], aug.apply(images, view_params))
    # A process's share of a global batch: slicing the draws == slicing the result.
    full = aug.apply(images.repeat(views, 1, 1, 1), params)
    share = slice(4, 11)
    assert torch.equal(aug.apply(images.repeat(views, 1, 1, 1)[share], params.rows(share)), full[share])
    assert joint_batch(images, None, views, params) is images
    assert joint_batch(images, aug, 0, None) is images
    with pytest.raises(KdtoolError):
        joint_batch(images, aug, 2, params)


def test_same_seed_same_output_and_other_seed_differs():
    aug = JointAugment("imagenet", p=0.5)
    images = _float_images(n=16, size=24)
    a = aug(images, torch.Generator().manual_seed(7))
    b = aug(images, torch.Generator().manual_seed(7))
    c = aug(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_input():
    with pytest.raises(KdtoolError, match="cifar10, cifar100, digits, imagenet, rotation"):
        JointAugment("cifar1000")
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(KdtoolError):
            JointAugment("cifar100", p=p)
    aug = JointAugment("cifar100")
    with pytest.raises(KdtoolError):
        aug.apply(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), aug.sample(2))
    with pytest.raises(KdtoolError):
        aug.apply(torch.zeros(2, 3, 8, 8), aug.sample(3))


def test_build_jda_from_recipe():
    assert build_jda(JDAConfig()) is None
    aug = build_jda(JDAConfig(policy="imagenet"))
    assert aug.policy is POLICIES["imagenet"] and aug.p == 0.2
    assert build_jda(JDAConfig(policy="digits", p=0.7)).p == 0.7


# ---------------------------------------------------------------- views in the paper's order
class _Accelerator:
    """What TrainViews reads of an Accelerator."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0


def _sample_batch(images: torch.Tensor, keys, padding: int, flip: bool) -> dict:
    """A loader batch of a dataset of one image size, as kdtool.data's training samples collate."""
    n = len(images)
    return {"image": images, "key": torch.as_tensor(keys, dtype=torch.long),
            "padding": torch.full((n,), padding), "flip": torch.full((n,), flip)}


def _authors_view(image: torch.Tensor, u: np.ndarray, aug, padding: int, flip: bool) -> torch.Tensor:
    """The authors' order for one image with Pillow (PolicyDatasetC100.__getitem__): the chain on
    the whole image (when `aug`), then RandomCrop(size, padding) with zero fill and the flip,
    at the offsets, flip and firing drawn from `u` (one view's key uniforms)."""
    img, (h, w) = _to_pil(image), image.shape[1:]
    if aug is not None:
        n_ops = len(aug.policy.ops)
        params = aug.params(u[None, 3:3 + n_ops], u[None, 3 + n_ops:3 + 2 * n_ops])
        for k, op in enumerate(aug.policy.ops):
            if params.fire[0, k]:
                img = _pil_op(img, op.name, op.magnitude, _argument(op.name, int(params.variant[0, k])))
    top, left = int(u[0] * (2 * padding + 1)), int(u[1] * (2 * padding + 1))
    img = ImageOps.expand(img, border=padding, fill=0).crop((left, top, left + w, top + h))
    return _from_pil(ImageOps.mirror(img) if flip and u[2] < 0.5 else img)


def _close_to_pillow(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    diff = (ours - ref).abs()
    return bool(diff.mean() <= 0.05 and (diff > 2).float().mean() <= 0.001)


@pytest.mark.parametrize("policy,p", [("cifar100", 0.5), ("imagenet", 0.5), ("rotation", 1.0), ("cifar100", 0.0)])
def test_views_match_the_authors_order_with_pillow(policy, p):
    """Originals and views made on the batch equal the authors' per-image Pillow pipeline."""
    from kdtool.augment import TrainViews, key_uniforms

    images, views, padding = torch.cat([IMAGES["digits32"]] * 2), 2, 4
    keys = torch.randint(0, 2**62, (len(images),), generator=torch.Generator().manual_seed(5))
    aug = JointAugment(policy, p=p)
    ours = (TrainViews(aug, views, seed=0)(_sample_batch(images, keys, padding, True), 0, _Accelerator()) * 255).round()
    assert ours.shape == (len(images) * (1 + views), 3, 32, 32)
    for view in range(1 + views):
        u = key_uniforms(keys.numpy(), view, 3 + 2 * len(aug.policy.ops))
        for i, image in enumerate(images):
            ref = _authors_view(image, u[i], aug if view else None, padding, True)
            assert _close_to_pillow(ours[view * len(images) + i], ref), (policy, view, i)


def test_crop_before_the_chain_breaks_tolerance():
    """Negative control: kdtool's former order (crop and flip once, the chain on that crop) differs
    from the authors' on most augmented samples."""
    from kdtool.augment import TrainViews, crop_flip, key_uniforms

    images, padding = IMAGES["digits32"], 4
    keys = torch.arange(len(images)) * 7919 + 11
    aug = JointAugment("cifar100", p=1.0)
    paper = TrainViews(aug, 1, seed=0)(_sample_batch(images, keys, padding, True), 0, _Accelerator())[len(images):]
    u = key_uniforms(keys.numpy(), 1, 3 + 2 * len(aug.policy.ops))
    flat = lambda column: torch.from_numpy(column)  # noqa: E731
    cropped = crop_flip(images, flat(np.floor(u[:, 0] * 9)).long(), flat(np.floor(u[:, 1] * 9)).long(),
                        flat(u[:, 2] < 0.5), padding)
    former = aug.apply_u8(cropped, aug.params(u[:, 3:17], u[:, 17:31])).float()
    agree = [_close_to_pillow(former[i], paper[i] * 255) for i in range(len(images))]
    assert sum(agree) <= len(images) // 4, agree


def test_p0_views_are_independent_crops_not_copies():
    """At p = 0 a view is the original only when its drawn crop and flip happen to coincide:
    1 / ((2 * padding + 1)^2 * 2) of the samples."""
    from kdtool.augment import TrainViews

    n, padding = 3000, 2
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    keys = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(1))
    joint = TrainViews(JointAugment("cifar100", p=0.0), 1, seed=0)(_sample_batch(images, keys, padding, True), 0,
                                                                  _Accelerator())
    copies = (joint[:n] == joint[n:]).flatten(1).all(1).float().mean().item()
    expected = 1 / ((2 * padding + 1) ** 2 * 2)
    assert abs(copies - expected) <= 4 * math.sqrt(expected * (1 - expected) / n), copies


def test_views_are_a_pure_function_of_the_sample():
    """(seed, epoch, index, view) -> the same view, whatever the batch holds; another epoch differs."""
    from kdtool.augment import TrainViews
    from kdtool.data import RandomCropFlip, SeededSamples, TensorImages
    from torch.utils.data import default_collate

    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    samples = SeededSamples(TensorImages(images, torch.arange(6), RandomCropFlip(2, True)), seed=3)
    views = TrainViews(JointAugment("cifar100", p=0.5), 2, seed=3)

    def joint(order):
        batch, _ = default_collate([samples[i] for i in order])
        return views(batch, step=0, accelerator=_Accelerator()).view(3, len(order), 3, 16, 16)

    samples.set_epoch(1)
    a, b = joint([0, 1, 2, 3, 4, 5]), joint([5, 3, 1])
    assert torch.equal(a[:, [5, 3, 1]], b)
    samples.set_epoch(2)
    assert not torch.equal(joint([5, 3, 1]), b)


def test_plain_tensor_batches_are_seeded_per_step():
    """A loader that yields plain images (a dataset without joint samples): draws per (seed, step)."""
    from kdtool.augment import TrainViews

    images = IMAGES["digits32"]
    views = TrainViews(JointAugment("cifar100", p=0.5), 1, seed=0)
    a, b = views(images, 7, _Accelerator()), views(images, 7, _Accelerator())
    assert torch.equal(a, b) and not torch.equal(a, views(images, 8, _Accelerator()))
    assert torch.equal(a[:len(images)] * 255, images.float())  # no crop: the images as they are


def test_views_from_the_loader_are_laid_out_view_major():
    from kdtool.augment import TrainViews

    stacked = torch.randint(0, 256, (4, 3, 3, 8, 8), dtype=torch.uint8)  # B = 4, original + 2 views
    joint = TrainViews(JointAugment("imagenet"), 2, seed=0)({"views": stacked}, 0, _Accelerator())
    assert torch.equal(joint.view(3, 4, 3, 8, 8), stacked.transpose(0, 1).float() / 255)
    assert torch.equal(TrainViews(None, 0, 0)({"views": stacked}, 0, _Accelerator()), stacked[:, 0].float() / 255)
    with pytest.raises(KdtoolError, match="in_loader"):
        TrainViews(JointAugment("imagenet"), 1, seed=0)({"views": stacked[:, :1]}, 0, _Accelerator())


def test_rot90_turns_square_batches_and_canvases_of_any_shape():
    aug = JointAugment("rotation")
    wide = torch.arange(2 * 3 * 4 * 6, dtype=torch.uint8).view(2, 3, 4, 6)
    turns = JDAParams(torch.ones(2, 1, dtype=torch.bool), torch.tensor([[0], [2]]))  # 1 and 3 quarter turns
    with pytest.raises(KdtoolError, match="square"):
        aug.apply_u8(wide, JDAParams(torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 1, dtype=torch.long)))
    with pytest.raises(KdtoolError, match="square"):
        aug.apply_canvas(wide, np.array([[4, 6], [4, 6]]), turns)
    canvas = torch.zeros(2, 3, 6, 6, dtype=torch.uint8)
    canvas[:, :, :4, :6] = wide
    turned, hw = aug.apply_canvas(canvas, np.array([[4, 6], [4, 6]]), turns)
    assert hw.tolist() == [[6, 4], [6, 4]]
    for i, k in enumerate((1, 3)):
        assert torch.equal(turned[i, :, :6, :4], torch.rot90(wide[i], k, (1, 2)))


# ---------------------------------------------------------------- images of differing sizes
MIXED = ((37, 53), (1, 40), (40, 1), (2, 9), (64, 17), (13, 90), (3, 3), (50, 50))  # (h, w)


def _mixed_images() -> list[torch.Tensor]:
    """Noise and smooth gradients of MIXED sizes."""
    gen = torch.Generator().manual_seed(0)
    images = []
    for i, (h, w) in enumerate(MIXED):
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        smooth = torch.stack([(yy * 7 + xx * 3 + i * 11) % 256, (xx * 5) % 256, (yy * 255) // max(h - 1, 1)])
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) if i % 2
                      else smooth.to(torch.uint8))
    return images


def _on_canvas(images, square: bool, fill: int = 77):
    tall, wide = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    if square:
        tall = wide = max(tall, wide)
    canvas = torch.full((len(images), 3, tall, wide), fill, dtype=torch.uint8)
    for k, image in enumerate(images):
        canvas[k, :, :image.shape[1], :image.shape[2]] = image
    return canvas, np.array([image.shape[1:] for image in images])


def _every_op_and_variant():
    magnitudes = {"shearX": 0.3, "shearY": 1 / 6, "translateX": 0.4028, "translateY": 0.2, "rotate": 13.3,
                  "posterize": 5, "solarize": 142.2, "contrast": 0.5, "brightness": 0.9, "sharpness": 0.7, "color": 0.4}
    for name in sorted(ops_module._OPS):
        for variant, _ in enumerate(ops_module._variants(name)):
            yield name, magnitudes.get(name, 0.0), variant


@pytest.mark.parametrize("name,magnitude,variant", list(_every_op_and_variant()))
def test_each_op_on_a_canvas_equals_the_op_on_each_image_alone(name, magnitude, variant):
    """Statistics over each image's own pixels, geometry about its own centre with grey inside its
    own extent, sharpness's border rule at its own border: the padding never leaks in."""
    images = _mixed_images()
    aug = JointAugment(Policy("one", (Op(name, magnitude),), 1.0))
    params = JDAParams(torch.ones(len(images), 1, dtype=torch.bool), torch.full((len(images), 1), variant))
    for fill in (0, 255):
        out, hw = aug.apply_canvas(*_on_canvas(images, square=name == "rot90", fill=fill), params)
        for k, image in enumerate(images):
            alone = aug.apply_u8(image[None], params.rows(slice(k, k + 1)))[0]
            assert tuple(hw[k]) == tuple(alone.shape[1:]), (name, k)
            assert torch.equal(out[k, :, :hw[k][0], :hw[k][1]], alone), (name, variant, MIXED[k], fill)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policies_on_a_canvas_equal_the_per_image_chain(policy):
    images = _mixed_images() * 3
    aug = JointAugment(policy, 0.6)
    params = aug.sample(len(images), torch.Generator().manual_seed(3))
    out, hw = aug.apply_canvas(*_on_canvas(images, square=policy == "rotation"), params)
    for k, image in enumerate(images):
        alone = aug.apply_u8(image[None], params.rows(slice(k, k + 1)))[0]
        assert torch.equal(out[k, :, :hw[k][0], :hw[k][1]], alone), (policy, k)


def test_batched_crops_equal_pillow():
    """RandomResizedCrop boxes within each image; the batched resampling equals Pillow's passes."""
    from kdtool.augment.resample import CROP_SLOTS, crop_boxes, crop_resize, crop_resize_pil

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((375, 500), (1, 300), (300, 1), (7, 9), (60, 1000))]
    canvas, hw = _on_canvas([torch.from_numpy(a).permute(2, 0, 1) for a in images], square=False)
    for size in (224, 5):
        boxes = crop_boxes(rng.random((len(images), CROP_SLOTS)), hw[:, 0], hw[:, 1])
        assert ((boxes[:, :2] >= 0) & (boxes[:, :2] + boxes[:, 2:] <= hw) & (boxes[:, 2:] > 0)).all()
        flips = np.array([True, False, True, False, True])
        out = crop_resize(canvas, boxes, size, flips)
        for k, array in enumerate(images):
            assert torch.equal(out[k], crop_resize_pil(Image.fromarray(array), boxes[k], size, flips[k])), k


def test_each_resampling_pass_is_pillows():
    """One pass at a time (the other size kept) Pillow runs exactly one pass: ours equals it."""
    from kdtool.augment.resample import crop_resize

    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (262, 228, 3), dtype=np.uint8)
    canvas = torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()
    whole = np.array([[0, 0, 262, 228]])
    for target in ((100, 262), (228, 31), (500, 262), (228, 600)):  # (width, height)
        ref = torch.from_numpy(np.asarray(Image.fromarray(array).resize(target, Image.BILINEAR)).copy()).permute(2, 0, 1)
        if target[1] == 262:
            ours = _one_pass(canvas, whole, target[0], dim=3)
        else:
            ours = _one_pass(canvas, whole, target[1], dim=2)
        assert torch.equal(ours[0], ref), target
    assert crop_resize(canvas, whole, 224, np.array([False])).shape == (1, 3, 224, 224)


def _one_pass(canvas, box, size, dim):
    from kdtool.augment.resample import _coefficients, _resample_pass

    extent = box[:, 3] if dim == 3 else box[:, 2]
    weights, first = _coefficients(extent, size)
    return _resample_pass(canvas, dim, weights, first, np.zeros(1, dtype=np.int64))
