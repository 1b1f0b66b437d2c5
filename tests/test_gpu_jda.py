"""JDA views of images of differing sizes made on CUDA: pixel for pixel the CPU's and the loader's.
Marked `gpu`; skips with the reason where CUDA is absent. On a GPU machine:

    python -m pytest -m gpu tests/test_gpu_jda.py -v -rs
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtool.augment import POLICIES, JDAParams, JointAugment, Op, Policy, TrainViews, differing_size_views
from kdtool.augment import ops as ops_module

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")]
SIZES = ((375, 500), (500, 375), (1, 300), (300, 1), (33, 47), (2, 2), (120, 7), (64, 64))  # (h, w)


def _packed(n: int, seed: int = 0):
    """n random images of SIZES (in turn), packed HWC as the loader hands them over, with their sizes."""
    rng = np.random.default_rng(seed)
    hw = np.array([SIZES[i % len(SIZES)] for i in range(n)], dtype=np.int64)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in hw]
    return torch.from_numpy(np.concatenate([image.reshape(-1) for image in images])), hw


@pytest.mark.parametrize("policy", list(POLICIES))
def test_views_of_differing_sizes_on_cuda_equal_the_cpu(policy):
    pixels, hw = _packed(24)
    keys = np.arange(24, dtype=np.int64) * 7919 + 3
    augment = JointAugment(policy, p=0.6)
    cpu = differing_size_views(pixels, hw, keys, augment, 2, 224)
    cuda = differing_size_views(pixels.cuda(), hw, keys, augment, 2, 224)
    assert torch.equal(cuda.cpu(), cpu)


def test_each_op_on_a_cuda_canvas_equals_the_cpu():
    rng = np.random.default_rng(1)
    hw = np.array(SIZES, dtype=np.int64)
    side = int(hw.max())
    canvas = torch.from_numpy(rng.integers(0, 256, (len(hw), 3, side, side), dtype=np.uint8))
    for name in sorted(ops_module._OPS):
        for variant, _ in enumerate(ops_module._variants(name)):
            augment = JointAugment(Policy("one", (Op(name, 0.3 if name != "rotate" else 13.3),), 1.0))
            params = JDAParams(torch.ones(len(hw), 1, dtype=torch.bool), torch.full((len(hw), 1), variant))
            cpu, cpu_hw = augment.apply_canvas(canvas, hw, params)
            cuda, cuda_hw = augment.apply_canvas(canvas.cuda(), hw, params)
            assert (cpu_hw == cuda_hw).all()
            for k, (h, w) in enumerate(cpu_hw):
                assert torch.equal(cuda[k, :, :h, :w].cpu(), cpu[k, :, :h, :w]), (name, variant, k)


def test_loader_views_equal_views_made_on_cuda(tmp_path):
    """The same ImageFolder batch through either path gives the same joint batch on CUDA."""
    from test_data import _Accelerator, write_mixed_imagefolder

    from kdtool.data import SeededSamples, build_datasets, build_loader
    from kdtool.recipe import DataConfig

    class _Cuda(_Accelerator):
        device = torch.device("cuda")

    write_mixed_imagefolder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, batch_size=8)
    train = build_datasets(cfg).train
    joint = {}
    for where in ("loader", "accelerator"):
        views = TrainViews(JointAugment("imagenet", p=0.6), 1, seed=0, where=where)
        torch.manual_seed(0)
        batch, _ = next(iter(build_loader(SeededSamples(train, 0, views.loader_views(_Cuda.device)), cfg, train=True)))
        joint[where] = views(batch, 0, _Cuda())
    assert joint["accelerator"].is_cuda and torch.equal(joint["loader"], joint["accelerator"])


def test_auto_makes_views_on_the_accelerator_on_cuda():
    assert TrainViews(JointAugment("imagenet"), 1, seed=0).loader_views(torch.device("cuda")) is None


# nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a pixel may differ from Pillow's by
# a few levels. The bound is torchvision's own for its CUDA decoder (test_decode_jpegs_cuda: mean
# absolute difference < 2 levels per image); kdtool's README quotes it.
NVJPEG_MEAN_LEVELS = 2.0


def test_jpegs_decoded_on_cuda_stay_within_the_documented_tolerance_of_pillow(tmp_path):
    """data.decode: accelerator on CUDA: every JPEG of a batch decoded by nvJPEG (its header's size,
    RGB) within NVJPEG_MEAN_LEVELS of Pillow; the files routed to the CPU equal Pillow exactly."""
    from test_data import _decode_train, write_decode_folder

    from kdtool.data import collate_samples, decode_fallback, decode_on_device

    _, train = _decode_train(write_decode_folder(tmp_path))
    batch, _ = collate_samples([train.joint_sample(i) for i in range(len(train))])
    decoded = decode_on_device(batch, torch.device("cuda"), decode_fallback(train)).cpu()
    assert decoded.is_cuda is False and len(batch["encoded_row"]) >= 2
    offset, encoded_rows = 0, set(batch["encoded_row"].tolist())
    for row, (path, _) in enumerate(train.folder.samples):
        pillow = torch.from_numpy(np.array(train.folder.loader(path))).reshape(-1)
        mine = decoded[offset:offset + len(pillow)]
        offset += len(pillow)
        if row in encoded_rows:
            assert (mine.float() - pillow.float()).abs().mean() < NVJPEG_MEAN_LEVELS, path
        else:
            assert torch.equal(mine, pillow), path
    assert offset == len(decoded)


def test_corrupt_jpeg_on_cuda_falls_back_and_is_counted(tmp_path):
    """A JPEG with no scan: nvJPEG refuses it, Pillow too, and data.bad_images skip counts it (with
    the JPEG cut in half, which the worker decoded on the CPU and skipped)."""
    from test_data import _decode_train, write_decode_folder

    from kdtool.data import collate_samples, decode_fallback, decode_on_device

    _, train = _decode_train(write_decode_folder(tmp_path, corrupt=True), bad_images="skip")
    batch, _ = collate_samples([train.joint_sample(i) for i in range(len(train))])
    pixels = decode_on_device(batch, torch.device("cuda"), decode_fallback(train))
    assert pixels.is_cuda and len(pixels) == int((batch["extent"][:, 0] * batch["extent"][:, 1]).sum()) * 3
    names = [path.rsplit("/", 1)[-1] for path, _ in train.folder.samples]
    assert train.skipped == 2 and bool(train.unreadable[names.index("g_noscan.jpg")])
