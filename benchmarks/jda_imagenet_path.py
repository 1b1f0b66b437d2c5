"""The ImageFolder data path on ImageNet-size JPEGs, loader side and accelerator side, per core.

JPEGs made from real photos (scikit-learn's sample images china.jpg and flower.jpg), cut and
resized to common ImageNet sizes (500x375, 375x500, 500x333, 333x500, 500x500, 640x480) and
encoded at quality 90 in memory (no files). One image = one original + one JDA view (imagenet
policy, p 0.2) at 224, as `recipes/imagenet_*.yaml` train. CPU rows, one thread (one loader
worker's share of one core), originals per second and ms of CPU per original:

    decode only             Pillow decodes the JPEG to RGB
    torchvision plain       decode + RandomResizedCrop(224) + flip + PILToTensor (one view)
    in-loader JDA (before)  decode + the chain on the full image + torchvision's RandomResizedCrop
                            + flip on uint8 tensors, original and view (kdtool before this path)
    loader path             decode + LoaderViews (augment.jda.device: loader, the CPU default)
    loader side             decode + hand over (what workers do with augment.jda.device:
                            accelerator): the decoded array, packed by collate_samples
    loader side, bytes      what workers do with data.decode: accelerator: read the header (no
                            decode), hand over the JPEG's bytes, packed by collate_samples
    device side (CPU)       differing_size_views on that packed batch (chain + crops), on the CPU

Targets: loader side <= 1.5 x decode only; on a CPU-only machine the sample path (loader path)
not slower than in-loader JDA before. With CUDA, also: the device side on CUDA for a batch of 256
at 224 (originals/s; aim >= 10,000 on an H100) and the step time of the ImageNet recipe's models
(ResNet-50 teacher, MobileNetV2 student, bf16, channels_last) fed by views made in the loader
(copied to the GPU) against views made on the GPU from the packed decoded images, and the JPEGs
decoded on the GPU in one batch (nvJPEG, `data.decode: accelerator`).

    python benchmarks/jda_imagenet_path.py --images 48 --repeats 3
"""
from __future__ import annotations

import argparse
import io
import random

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2

from jda_throughput import interleaved_medians, load_average
from kdtool.augment import JointAugment, TrainViews, differing_size_views, key_uniforms
from kdtool.augment.views import chain_params
from kdtool.data import accelerator_takes, collate_samples, decode_jpegs

SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480))  # (width, height)
CROP = 224


def make_jpegs(n: int) -> list[bytes]:
    """n JPEGs (quality 90) cut from scikit-learn's sample photos at SIZES, in turn."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]  # 640 x 427 each
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        photo, (w, h) = photos[i % len(photos)], SIZES[i % len(SIZES)]
        scale = max(w / photo.width, h / photo.height) * (1 + rng.random())
        big = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        left, top = rng.integers(0, big.width - w + 1), rng.integers(0, big.height - h + 1)
        buffer = io.BytesIO()
        big.crop((left, top, left + w, top + h)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def before_in_loader(aug: JointAugment):
    """kdtool's per-image path before the accelerator path: the chain on the decoded tensor, then
    torchvision's RandomResizedCrop + flip on uint8 tensors. (The chain's draws are the sample
    key's, as on the other rows, so that all run the same ops on the same images.)"""
    crop = v2.Compose([v2.RandomResizedCrop(CROP, antialias=True), v2.RandomHorizontalFlip()])

    def one(data: bytes, key: int) -> torch.Tensor:
        full = v2.functional.pil_to_tensor(decode(data))
        view = aug.apply_u8(full[None], chain_params(aug, key_uniforms(np.array([key]), 1, 256)))[0]
        return torch.stack([crop(full), crop(view)])
    return one


def hand_over_bytes(data: bytes, key: int):
    """A worker's sample with data.decode: accelerator: the header checked, the bytes handed over."""
    with Image.open(io.BytesIO(data)) as opened:
        if not accelerator_takes(opened, data):
            raise ValueError("a benchmark JPEG the accelerator would not take")
        extent = (opened.height, opened.width)
    return {"encoded": np.frombuffer(data, dtype=np.uint8), "extent": extent, "index": key, "key": key, "size": CROP}, 0


def cpu_rows(jpegs: list[bytes], repeats: int) -> list[tuple[str, float]]:
    aug = JointAugment("imagenet")
    plain = transforms.Compose([transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip(),
                                transforms.PILToTensor()])
    loader_views = TrainViews(aug, 1, seed=0, where="loader").loader_views(torch.device("cpu"))
    before = before_in_loader(aug)
    handed = [({"pixels": np.asarray(decode(d)), "key": k, "size": CROP}, 0) for k, d in enumerate(jpegs)]
    packed, _ = collate_samples(handed)
    cases = [
        ("decode only", lambda: [decode(d) for d in jpegs]),
        ("torchvision plain", lambda: [plain(decode(d)) for d in jpegs]),
        ("in-loader JDA (before)", lambda: [before(d, k) for k, d in enumerate(jpegs)]),
        ("loader path", lambda: [loader_views(decode(d), k, CROP) for k, d in enumerate(jpegs)]),
        ("loader side", lambda: collate_samples([({"pixels": np.asarray(decode(d)), "key": k, "size": CROP}, 0)
                                                 for k, d in enumerate(jpegs)])),
        ("loader side, bytes", lambda: collate_samples([hand_over_bytes(d, k) for k, d in enumerate(jpegs)])),
        ("device side (CPU)", lambda: differing_size_views(packed["pixels"], packed["extent"].numpy(),
                                                           packed["key"].numpy(), aug, 1, CROP)),
    ]
    times = interleaved_medians([fn for _, fn in cases], repeats)
    return [(name, t / len(jpegs)) for (name, _), t in zip(cases, times)]


def gpu_rows(jpegs: list[bytes], batch: int, repeats: int) -> list[tuple[str, float]]:
    """Device side on CUDA (s per original) and one training step fed by either path (s per step)."""
    device = torch.device("cuda")
    aug = JointAugment("imagenet")
    samples = [({"pixels": np.asarray(decode(jpegs[i % len(jpegs)])), "key": i, "size": CROP}, 0)
               for i in range(batch)]
    packed, _ = collate_samples(samples)
    pixels, hw, keys = packed["pixels"].pin_memory().to(device), packed["extent"].numpy(), packed["key"].numpy()

    def chain_and_crops():
        out = differing_size_views(pixels, hw, keys, aug, 1, CROP)
        torch.cuda.synchronize()
        return out

    loader_views = TrainViews(aug, 1, seed=0, where="loader").loader_views(torch.device("cpu"))
    made = torch.stack([loader_views(Image.fromarray(s["pixels"]), s["key"], CROP) for s, _ in samples])
    made = made.transpose(0, 1).reshape(-1, 3, CROP, CROP).pin_memory()
    step = _training_step(device)
    from_loader = lambda: step(made.to(device, non_blocking=True))  # noqa: E731
    on_gpu = lambda: step(differing_size_views(pixels, hw, keys, aug, 1, CROP))  # noqa: E731
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    chain_and_crops()
    print(f"device side (CUDA), batch {batch}: peak memory {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB "
          f"above the packed images ({pixels.numel() / 2**20:.0f} MiB)")
    encoded = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(batch)]

    def nvjpeg():  # data.decode: accelerator
        out = decode_jpegs(encoded, device)
        torch.cuda.synchronize()
        return out

    t_views, t_loader, t_gpu, t_decode = interleaved_medians([chain_and_crops, from_loader, on_gpu, nvjpeg], repeats)
    return [(f"device side (CUDA), batch {batch}", t_views / batch),
            (f"step, views from the loader, batch {batch}", t_loader),
            (f"step, views made on the GPU, batch {batch}", t_gpu),
            (f"decode on CUDA (nvJPEG, data.decode: accelerator), batch {batch}", t_decode / batch)]


def _training_step(device: torch.device):
    """ResNet-50 (frozen teacher) + MobileNetV2 (student): forward both on the joint batch, the
    student's backward and an SGD step, bf16 autocast, channels_last; synchronised."""
    from torchvision.models import mobilenet_v2, resnet50

    teacher = resnet50().to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    student = mobilenet_v2().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def step(u8: torch.Tensor) -> None:
        inputs = ((u8.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                target = teacher(inputs).argmax(1)
            loss = torch.nn.functional.cross_entropy(student(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48, help="JPEGs per timed CPU run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    jpegs = make_jpegs(args.images)
    print(f"{args.images} JPEGs (quality 90, {', '.join(f'{w}x{h}' for w, h in SIZES)}), original + 1 view at "
          f"{CROP}, imagenet policy p 0.2, torch threads 1, median of {args.repeats} interleaved runs; {load_average()}")
    rows = dict(cpu_rows(jpegs, args.repeats))
    print(f"\n{'per core':<40} {'originals/s':>12} {'ms/original':>12}")
    for name, seconds in rows.items():
        print(f"{name:<40} {1 / seconds:>12.0f} {1000 * seconds:>12.2f}")
    decode_only = rows["decode only"]
    print(f"\nratio loader side / decode only = {rows['loader side'] / decode_only:.2f} (target <= 1.5)")
    print(f"ratio loader side with data.decode: accelerator / decode only = {rows['loader side, bytes'] / decode_only:.2f}")
    print(f"ratio CPU-only sample path: loader path vs in-loader JDA before = "
          f"{rows['in-loader JDA (before)'] / rows['loader path']:.2f}x as fast (target >= 1)")
    print(f"ratio loader side + device side (CPU) vs in-loader JDA before = "
          f"{rows['in-loader JDA (before)'] / (rows['loader side'] + rows['device side (CPU)']):.2f}x as fast")
    if torch.cuda.is_available():
        print(f"\nCUDA: {torch.cuda.get_device_name()}")
        gpu = gpu_rows(jpegs, args.gpu_batch, args.repeats)
        print(f"{gpu[0][0]}: {1 / gpu[0][1]:.0f} originals/s (aim >= 10,000 on an H100)")
        for name, seconds in gpu[1:3]:
            print(f"{name}: {1000 * seconds:.1f} ms")
        print(f"{gpu[3][0]}: {1 / gpu[3][1]:.0f} originals/s ({rows['decode only'] / gpu[3][1]:.1f}x one core's Pillow)")
        print(f"ratio step time, GPU views / loader views = {gpu[2][1] / gpu[1][1]:.2f}")
    else:
        print("\nno CUDA here: the GPU rows (device side at batch 256, step times, nvJPEG decode) were not measured")
    print(f"after the runs: {load_average()}")


if __name__ == "__main__":
    main()
