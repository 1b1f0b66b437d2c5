"""Training-step time of CCD + JDA against plain KD on the same 2B samples, in one run.

Each step is one teacher forward (no grad) + student forward/backward + optimizer step on a joint
batch of B originals and B augmented views. ``kd`` and ``ccd`` (no JDA cost) reuse one pre-made
joint batch; ``ccd+JDA`` makes it inside the step from the loader's batch of B uncropped uint8
images, as training does (kdtool.augment.TrainViews: the cifar100 chain on the whole images, then
a random crop with padding 4 and a flip drawn for each original and each view). The variants are
interleaved (each repeat times every variant in turn) and the median step time is reported,
with the ratios ccd+JDA / kd (target <= 1.05) and ccd / kd. Runs on the CPU, and on CUDA
when a device is present.

    python benchmarks/ccd_step.py --batch 64 --repeats 30 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdtool.augment import JointAugment, TrainViews
from kdtool.losses import build_loss
from kdtool.models import build_model
from kdtool.recipe import MethodConfig

NUM_CLASSES = 100
LOSS_ARGS = dict(temperature=4.0, alpha=0.5, kd_weight=2.0)


def _loss(name: str):
    return build_loss(MethodConfig(name=name, **LOSS_ARGS))[0]


def make_step(student, teacher, optimizer, loss_fn, make_inputs, targets):
    """One training step on the joint batch that `make_inputs()` returns."""
    def step():
        inputs = make_inputs()
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss = loss_fn(student(inputs), teacher_logits, targets, 1)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_variants(variants: dict, repeats: int, sync) -> dict[str, float]:
    """Median seconds per step of each variant, timed in turn (interleaved) after a warm-up."""
    times = {name: [] for name in variants}
    for step in variants.values():
        step()
        step()
    sync()
    for _ in range(repeats):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class _Accelerator:
    """What TrainViews reads of an Accelerator."""

    def __init__(self, device: torch.device):
        self.device, self.num_processes, self.process_index = device, 1, 0


def run(device: torch.device, batch: int, size: int, repeats: int) -> None:
    torch.manual_seed(0)
    student = build_model("resnet8", NUM_CLASSES).to(device).train()
    teacher = build_model("resnet14", NUM_CLASSES).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loader_batch = {"image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device),
                    "key": torch.randint(0, 2**62, (batch,)), "padding": torch.full((batch,), 4),
                    "flip": torch.ones(batch, dtype=torch.bool)}
    targets = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    views = TrainViews(JointAugment("cifar100"), 1, seed=0)
    accelerator = _Accelerator(device)
    premade = views(loader_batch, 0, accelerator)

    def jda_inputs():
        return views({**loader_batch, "key": torch.randint(0, 2**62, (batch,))}, 0, accelerator)  # new samples

    common = dict(student=student, teacher=teacher, optimizer=optimizer, targets=targets)
    variants = {
        "kd": make_step(loss_fn=_loss("kd"), make_inputs=lambda: premade, **common),
        "ccd": make_step(loss_fn=_loss("ccd"), make_inputs=lambda: premade, **common),
        "ccd+JDA": make_step(loss_fn=_loss("ccd"), make_inputs=jda_inputs, **common),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = time_variants(variants, repeats, sync)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}: resnet14 -> resnet8, {batch} originals + {batch} views at {size}x{size}, "
          f"median of {repeats} interleaved steps")
    for variant, seconds in medians.items():
        print(f"  {variant:8s} {seconds * 1e3:8.1f} ms/step")
    print(f"  ccd+JDA / kd = {medians['ccd+JDA'] / medians['kd']:.3f}   (target <= 1.05)")
    print(f"  ccd / kd     = {medians['ccd'] / medians['kd']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="originals per step (the step sees twice as many)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(torch.device("cpu"), args.batch, args.size, args.repeats)
    if torch.cuda.is_available():
        run(torch.device("cuda"), args.batch, args.size, args.repeats)
    else:
        print("\nCUDA skipped: torch.cuda.is_available() is False (no CUDA device).")


if __name__ == "__main__":
    main()
