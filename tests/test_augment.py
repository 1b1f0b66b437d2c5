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
    params = JDAParams(torch.ones(n, 1, dtype=torch.bool), torch.full((n, 1), float(sign)))
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
                img = _pil_op(img, op.name, op.magnitude, params.sign[i, k].item())
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
    assert set(params.sign.unique().tolist()) == {-1.0, 1.0}
    positive = (params.sign > 0).float().mean(0)
    assert ((positive - 0.5).abs() <= 4 * math.sqrt(0.25 / n)).all(), positive


def test_policies_as_in_design():
    names = {k: [op.name for op in POLICIES[k].ops] for k in POLICIES}
    assert names["cifar100"] == [
        "autocontrast", "contrast", "posterize", "solarize", "translateY", "shearX",
        "brightness", "shearY", "translateX", "sharpness", "invert", "color", "equalize", "rotate"]
    assert [op.magnitude for op in POLICIES["cifar100"].ops] == [
        0, 0.3, 8, 142, 0.40, 0.17, 0.3, 0, 0.05, 0.5, 0, 0.4, 0, 10]
    assert names["cifar10"] == [
        "invert", "rotate", "shearY", "posterize", "autocontrast", "color", "sharpness",
        "equalize", "contrast", "translateY", "brightness", "solarize", "translateX", "shearX"]
    assert [op.magnitude for op in POLICIES["cifar10"].ops] == [
        0, 6.7, 0.27, 4, 0, 0.3, 0.9, 0, 0.7, 0.15, 0.6, 199, 0.15, 0.27]
    assert [(op.name, op.magnitude) for op in POLICIES["imagenet"].ops] == [
        ("posterize", 4), ("solarize", 114), ("equalize", 0), ("posterize", 5), ("equalize", 0),
        ("equalize", 0), ("solarize", 171), ("posterize", 6), ("rotate", 10), ("equalize", 0),
        ("rotate", 26.7), ("rotate", 30), ("equalize", 0), ("invert", 0), ("color", 0.4),
        ("rotate", 26.7), ("color", 0.8), ("sharpness", 0.7), ("shearX", 0.17), ("color", 0),
        ("equalize", 0), ("solarize", 114), ("invert", 0), ("color", 0.4), ("equalize", 0)]
    assert POLICIES["digits"].ops == POLICIES["cifar100"].ops
    assert {k: (len(v.ops), v.p) for k, v in POLICIES.items()} == {
        "cifar100": (14, 0.3), "cifar10": (14, 0.5), "imagenet": (25, 0.2), "digits": (14, 0.3)}


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
    with pytest.raises(KdtoolError, match="cifar10, cifar100, digits, imagenet"):
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
