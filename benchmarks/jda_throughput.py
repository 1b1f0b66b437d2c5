"""Throughput of kdtool's JDA views against the authors' per-image Pillow pipeline, in the same order.

Both sides make, for each image, the original and one augmented view as the paper does: the
policy's chain on the whole image (each op firing with probability p), then the dataset's random
transform drawn separately for the original and the view, ending in float [0, 1] tensors.

- images of one size (cifar100 policy): kdtool's TrainViews on a batch of uncropped uint8 images
  (chain, zero-padded crops and flips on the batch) against, per image, Pillow's chain then
  torchvision's RandomCrop(size, padding) + RandomHorizontalFlip + ToTensor on PIL images;
- images of differing sizes (imagenet policy): what kdtool's loader worker does per image with
  augment.jda.device: loader (LoaderViews: the chain on the decoded image, RandomResizedCrop +
  flip per view resampled by Pillow) plus TrainViews on the stacked batch, against Pillow's chain
  then RandomResizedCrop + flip + ToTensor. (benchmarks/jda_imagenet_path.py measures the data
  path on ImageNet-size JPEGs, loader side and accelerator side.)

Normalisation is left out on both sides. One thread by default (one loader worker's share).
Reports the median of --repeats timed runs after a warm-up; the two sides alternate so that a
load change on a shared machine hits both alike, and the load average is printed with the results.

    python benchmarks/jda_throughput.py --batch 128 --sizes 32 224 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms

from kdtool.augment import JointAugment, TrainViews

GREY = (128, 128, 128)


def _sign() -> int:
    return random.choice([-1, 1])


def _rotate(img, m):
    rot = img.convert("RGBA").rotate(m)
    return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)


PIL_OPS = {
    "autocontrast": lambda img, m: ImageOps.autocontrast(img),
    "equalize": lambda img, m: ImageOps.equalize(img),
    "invert": lambda img, m: ImageOps.invert(img),
    "posterize": lambda img, m: ImageOps.posterize(img, int(m)),
    "solarize": lambda img, m: ImageOps.solarize(img, m),
    "contrast": lambda img, m: ImageEnhance.Contrast(img).enhance(1 + m * _sign()),
    "brightness": lambda img, m: ImageEnhance.Brightness(img).enhance(1 + m * _sign()),
    "sharpness": lambda img, m: ImageEnhance.Sharpness(img).enhance(1 + m * _sign()),
    "color": lambda img, m: ImageEnhance.Color(img).enhance(1 + m * _sign()),
    "shearX": lambda img, m: img.transform(
        img.size, Image.AFFINE, (1, m * _sign(), 0, 0, 1, 0), Image.BICUBIC, fillcolor=GREY),
    "shearY": lambda img, m: img.transform(
        img.size, Image.AFFINE, (1, 0, 0, m * _sign(), 1, 0), Image.BICUBIC, fillcolor=GREY),
    "translateX": lambda img, m: img.transform(
        img.size, Image.AFFINE, (1, 0, m * img.size[0] * _sign(), 0, 1, 0), fillcolor=GREY),
    "translateY": lambda img, m: img.transform(
        img.size, Image.AFFINE, (1, 0, 0, 0, 1, m * img.size[1] * _sign()), fillcolor=GREY),
    "rotate": _rotate,
}


def make_images(n: int, size: int) -> torch.Tensor:
    """Smooth synthetic colour images (gradients, a wave, a disc, a square), uint8 (n, 3, s, s)."""
    g = torch.Generator().manual_seed(size)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        a, b, c, d = torch.rand(4, generator=g).tolist()
        img = torch.stack([0.2 + 0.6 * xx * a, 0.1 + 0.7 * yy * b,
                           0.5 + 0.4 * torch.sin(6.28 * (xx + c * yy) * (1 + 3 * d))])
        img[:, (xx - a) ** 2 + (yy - b) ** 2 < 0.03 + 0.05 * c] = torch.tensor([[0.9], [0.3 * d], [0.1]])
        img[:, (xx > c) & (xx < c + 0.3) & (yy > d) & (yy < d + 0.3)] = torch.tensor([[0.1], [0.3], [0.8]])
        out[i] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median wall time of each fn over `repeats` rounds, the fns alternating within a round."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def load_average() -> str:
    try:
        return "load average {:.2f}, {:.2f}, {:.2f} on {} CPUs".format(*os.getloadavg(), os.cpu_count())
    except OSError:
        return "load average unavailable"


def authors_views(pil_images, ops, p: float, transform) -> list:
    """The authors' PolicyDataset __getitem__ for each image: the chain on the whole image
    (each op fires if random.random() < p), then the dataset's transform drawn separately for the
    original and the augmented image, stacked."""
    out = []
    for img in pil_images:
        new = img
        for op, m in ops:
            if random.random() < p:
                new = op(new, m)
        out.append(torch.stack([transform(img), transform(new)]))
    return out


def kdtool_batched(aug: JointAugment, u8: torch.Tensor, padding: int):
    """kdtool for images of one size: TrainViews on a loader batch of uncropped images."""
    views = TrainViews(aug, 1, seed=0)
    keys = torch.randint(0, 2**62, (len(u8),))
    batch = {"image": u8, "key": keys, "padding": torch.full((len(u8),), padding), "flip": torch.ones(len(u8), dtype=torch.bool)}
    return lambda: views(batch, 0, CPU)


def kdtool_in_loader(aug: JointAugment, pil_images, size: int):
    """kdtool for images of differing sizes, views made in the loader (augment.jda.device: loader):
    what a worker does per image (LoaderViews), then TrainViews on the stacked batch."""
    views = TrainViews(aug, 1, seed=0, where="loader")
    per_image = views.loader_views(CPU.device)

    def run():
        stacked = [per_image(img, key, size) for key, img in enumerate(pil_images)]
        return views({"views": torch.stack(stacked)}, 0, CPU)
    return run


class _CPU:
    device = torch.device("cpu")
    num_processes = 1
    process_index = 0


CPU = _CPU()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: one loader worker)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, one augmented view per image, torch threads {torch.get_num_threads()}, median of "
          f"{args.repeats} interleaved runs after a warm-up; {load_average()}")
    random.seed(0)
    torch.manual_seed(0)
    rows = []
    for size in args.sizes:
        u8 = make_images(args.batch, size)
        pil_images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in u8]
        padding = round(4 * size / 32)
        cases = [("cifar100", f"crop {size} pad {padding} + flip, on the batch", kdtool_batched,
                  (u8, padding), transforms.Compose([transforms.RandomCrop(size, padding=padding),
                                                     transforms.RandomHorizontalFlip(), transforms.ToTensor()])),
                 ("imagenet", f"RandomResizedCrop {size} + flip, per image", kdtool_in_loader,
                  (pil_images, size), transforms.Compose([transforms.RandomResizedCrop(size),
                                                          transforms.RandomHorizontalFlip(), transforms.ToTensor()]))]
        for policy, label, make, make_args, transform in cases:
            aug = JointAugment(policy)
            ops = [(PIL_OPS[op.name], op.magnitude) for op in aug.policy.ops]
            ours = make(aug, *make_args)
            t_ours, t_pil = interleaved_medians([ours, lambda: authors_views(pil_images, ops, aug.p, transform)],
                                                args.repeats)
            rows.append((size, policy, label, args.batch / t_ours, args.batch / t_pil))

    print(f"\n{'size':>5} {'policy':>9} {'views made':<44} {'kdtool img/s':>13} {'authors img/s':>14} {'ratio':>7}")
    for size, policy, label, ours, pil in rows:
        print(f"{size:>5} {policy:>9} {label:<44} {ours:>13.0f} {pil:>14.0f} {ours / pil:>6.2f}x")
    print()
    for size, policy, label, ours, pil in rows:
        target = " (target >= 1)" if size == 224 else ""
        print(f"ratio kdtool / authors' Pillow pipeline, {policy} at {size}x{size} = {ours / pil:.2f}{target}")
    print(f"after the runs: {load_average()}")


if __name__ == "__main__":
    main()
