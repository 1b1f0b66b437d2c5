"""kdtool's distillation loop vs a minimal hand-written PyTorch KD loop, side by side.

Same teacher/student, data, batch, loss (Hinton KD), optimizer and threads; one epoch of each,
interleaved over several repeats, median time per step. Prints the ratio kdtool / plain
(target <= 1.10 on the CPU). With --tensorboard, kdtool also logs to TensorBoard every
--log-every steps (the tracker's cost is then part of kdtool's step).

    python benchmarks/train_overhead.py --repeats 3 --threads 2
    python benchmarks/train_overhead.py --repeats 3 --threads 2 --tensorboard --log-every 10
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtool import build_datasets, build_loader, build_loss, build_model, load_recipe, normalize
from kdtool.recipe import MethodConfig
from kdtool.train import Teacher, build_accelerator, fit
from kdtool.train.tracking import tracking

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def plain_kd_epoch(student, teacher, loader, info, lr: float, temperature: float, alpha: float, weight: float) -> tuple[float, int]:
    """The loop a person would write by hand: seconds for one epoch and its step count."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    student.train()
    started, steps = time.perf_counter(), 0
    for images, targets in loader:
        inputs = normalize(images.float().div_(255), info).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        logits = student(inputs)
        kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                      log_target=True, reduction="batchmean")
        loss = weight * (alpha * F.cross_entropy(logits, targets) + (1 - alpha) * temperature**2 * kl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return time.perf_counter() - started, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tensorboard", action="store_true", help="log to TensorBoard (needs kdtool[tensorboard])")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    trackers = ["runtime.log_with=[tensorboard]", f"runtime.log_every={args.log_every}"] if args.tensorboard else []
    recipe = load_recipe(QUICKSTART, ["method.name=kd", "augment.jda.policy=null", "train.epochs=1",
                                      f"data.batch_size={args.batch}", "train.schedule.name=constant", *trackers])
    with tempfile.TemporaryDirectory() as logs:
        measure(recipe, args, Path(logs))


def measure(recipe, args, logs: Path) -> None:
    """Interleaved rounds of kdtool's `fit` and the plain loop; prints the medians and their ratio."""
    datasets = build_datasets(recipe.data)
    info = datasets.info
    teacher = build_model(recipe.teacher.name, info.num_classes).eval().requires_grad_(False)
    teacher = teacher.to(memory_format=torch.channels_last)
    loss_fn, _ = build_loss(MethodConfig(name="kd"))
    accelerator = build_accelerator(recipe.runtime, run_dir=logs)  # trackers (if any) log under logs/
    method = recipe.method

    kdtool_times, plain_times = [], []
    for repeat in range(args.repeats + 1):  # the first round warms up both
        with tempfile.TemporaryDirectory() as out, tracking(accelerator, f"round{repeat}", {"repeat": repeat}):
            torch.manual_seed(repeat)
            result = fit(build_model(recipe.student.name, info.num_classes), datasets, train_cfg=recipe.train,
                         data_cfg=recipe.data, runtime=recipe.runtime, accelerator=accelerator, out_dir=Path(out),
                         seed=repeat, loss_fn=loss_fn, teacher=Teacher(teacher), progress=False)
        kdtool_step = result.last["train_seconds"] / result.last["step"]
        torch.manual_seed(repeat)
        student = build_model(recipe.student.name, info.num_classes).to(memory_format=torch.channels_last)
        seconds, steps = plain_kd_epoch(student, teacher, build_loader(datasets.train, recipe.data, train=True), info,
                                        recipe.train.optimizer.lr, method.temperature, method.alpha, method.kd_weight)
        if repeat:
            kdtool_times.append(kdtool_step)
            plain_times.append(seconds / steps)
        print(f"round {repeat}{' (warm-up)' if not repeat else ''}: kdtool {kdtool_step * 1000:.1f} ms/step, "
              f"plain {seconds / steps * 1000:.1f} ms/step")

    kdtool_ms, plain_ms = statistics.median(kdtool_times) * 1000, statistics.median(plain_times) * 1000
    logged = f", TensorBoard every {args.log_every} steps" if args.tensorboard else ""
    print(f"\nteacher {recipe.teacher.name}, student {recipe.student.name}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, device {accelerator.device}{logged}")
    print(f"kdtool step: {kdtool_ms:.1f} ms   plain PyTorch KD step: {plain_ms:.1f} ms")
    print(f"ratio kdtool / plain = {kdtool_ms / plain_ms:.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
