"""Throughput of batched JDA (kdtool.augment) against the reference's per-image Pillow chain.

Both sides run the same policy (cifar100 by default) at the same p on the same images: the
batched side takes a uint8 batch, converts it to float [0, 1] and augments it on the CPU; the
Pillow side does what the reference dataset does, for each image, for each op,
``if random.random() < p: apply``. Reports the median of --repeats timed runs after a warm-up;
the batched and Pillow runs alternate (batched, PIL, batched, PIL, ...) so that a load change on
a shared machine hits both sides alike, and the load average is printed with the results.
With a CUDA device it also times JDA on the GPU against a torchvision resnet50 forward pass
(random weights) on the same batch.

    python benchmarks/jda_throughput.py --batch 256 --sizes 32 224 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from kdtool.augment import POLICIES, JointAugment

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


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--policy", default="cifar100", choices=sorted(POLICIES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    aug = JointAugment(args.policy)
    ops = [(PIL_OPS[op.name], op.magnitude) for op in aug.policy.ops]
    print(f"JDA policy {aug.policy.name} ({len(ops)} ops), p={aug.p}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats} interleaved runs after a "
          f"warm-up; {load_average()}")

    rows = []
    for size in args.sizes:
        u8 = make_images(args.batch, size)
        pil_images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in u8]
        gen = torch.Generator().manual_seed(0)
        random.seed(0)

        def batched():
            return aug(u8.float().div_(255), gen)

        def per_image():
            out = []
            for img in pil_images:
                for op, m in ops:
                    if random.random() < aug.p:
                        img = op(img, m)
                out.append(np.asarray(img))
            return out

        t_batched, t_pil = interleaved_medians([batched, per_image], args.repeats)
        rows.append((size, args.batch / t_batched, args.batch / t_pil))

    print(f"\n{'size':>6} {'batched img/s':>14} {'PIL img/s':>12} {'batched/PIL':>12}")
    for size, batched_rate, pil_rate in rows:
        print(f"{size:>6} {batched_rate:>14.0f} {pil_rate:>12.0f} {batched_rate / pil_rate:>11.2f}x")
    print()
    for size, batched_rate, pil_rate in rows:
        target = " (target >= 1)" if size == 224 else ""
        print(f"ratio batched / PIL at {size}x{size} = {batched_rate / pil_rate:.2f}{target}")
    print(f"after the runs: {load_average()}")

    if not torch.cuda.is_available():
        print("\nGPU comparison skipped: torch.cuda.is_available() is False (no CUDA device).")
        return
    import torchvision

    device = torch.device("cuda")
    size = 224
    u8 = make_images(args.batch, size).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device).eval()
    x = u8.float().div(255)
    sync = torch.cuda.synchronize

    def forward():
        with torch.no_grad():
            model(x)

    t_jda = median_time(lambda: aug(u8.float().div_(255), gen), args.repeats, sync)
    t_fwd = median_time(forward, args.repeats, sync)
    print(f"\nGPU ({torch.cuda.get_device_name(device)}), batch {args.batch} at {size}x{size}: "
          f"JDA {t_jda * 1e3:.1f} ms ({args.batch / t_jda:.0f} img/s), resnet50 forward "
          f"(fp32, no grad) {t_fwd * 1e3:.1f} ms; JDA = {100 * t_jda / t_fwd:.1f}% of the forward")


if __name__ == "__main__":
    main()
