"""The same 4-cell sweep on the serial executor and on Ray, side by side, and Ray's cost per cell.

Both run the tiny quickstart (teacher trained once, then 4 cells: 2 methods x 2 seeds) with one
torch thread per cell (`runtime.threads=1`), so a cell computes the same on either executor and Ray
can run as many cells at once as the machine has cores. The Ray side starts its local Ray first
(that start-up is reported apart: a cluster is started once for many sweeps) and warms one worker
per core (imports and the dataset read, which a long sweep pays once per worker). Printed:
wall-clock of each, the speed-up serial / Ray (aim >= 1.6 on 2 cores), and Ray's overhead per
cell: how much longer than a perfect split of the serial time over the cores Ray took, per cell
(task submission, scheduling, the cell's data read and models built in the worker).

    python benchmarks/sweep_scaling.py --epochs 12
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from kdtool.sweep import ExecutorConfig, run_sweep

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
GRID = {"method.name": ["kd", "ccd"]}


def overrides(epochs: int) -> list[str]:
    return ["teacher.name=resnet8", "teacher.train.epochs=1", f"train.epochs={epochs}", "data.image_size=16",
            "data.train_fraction=0.25", "data.batch_size=32", "runtime.threads=1"]


def timed_sweep(out: Path, teacher_home: Path, epochs: int, executor: ExecutorConfig) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    rows = run_sweep(QUICKSTART, GRID, seeds=2, overrides=overrides(epochs), out=out, progress=False,
                     teacher_home=teacher_home, executor=executor)
    return time.perf_counter() - started, rows


def training_seconds(rows: list[dict]) -> float:
    """Seconds the cells spent in their epochs (metrics.jsonl), summed: slower on a machine others share."""
    return sum(json.loads(line)["epoch_seconds"] for row in rows
               for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines())


def start_ray(cores: int) -> float:
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def warm():  # what a cell's worker does once: import kdtool's training and read the dataset
        from kdtool import build_datasets, load_recipe

        build_datasets(load_recipe(QUICKSTART, overrides(1)).data)
        time.sleep(1)

    ray.get([warm.remote() for _ in range(cores)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="student epochs per cell")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        # The teacher is trained once in its own home, before either sweep: both time the 4 cells only.
        teacher_home = Path(tmp) / "teacher"
        run_sweep(QUICKSTART, {"method.name": ["kd"]}, seeds=1, overrides=overrides(1), out=Path(tmp) / "warm",
                  progress=False, teacher_home=teacher_home)
        torch.set_num_threads(1)
        serial, serial_rows = timed_sweep(Path(tmp) / "serial", teacher_home, args.epochs, ExecutorConfig())
        ray_start = start_ray(cores)
        on_ray, ray_rows = timed_sweep(Path(tmp) / "ray", teacher_home, args.epochs, ExecutorConfig(name="ray"))
        trained = training_seconds(serial_rows), training_seconds(ray_rows)
    same = [{k: v for k, v in r.items() if k != "run_dir"} for r in serial_rows] == \
           [{k: v for k, v in r.items() if k != "run_dir"} for r in ray_rows]
    lanes = min(cores, 4)  # cells Ray can run at once
    print(f"cores: {cores}; 4 cells of {args.epochs} epochs each; tables equal: {same}")
    print(f"serial: {serial:.1f} s   ray: {on_ray:.1f} s   (ray start-up, once: {ray_start:.1f} s)")
    print(f"cells' epochs, summed: serial {trained[0]:.1f} s, ray {trained[1]:.1f} s "
          f"(equal on an idle machine; more on ray when other processes take the cores)")
    print(f"speed-up serial / ray: {serial / on_ray:.2f}x (aim >= 1.6 on 2 cores)")
    print(f"ray overhead per cell: {(on_ray - serial / lanes) * lanes / 4:.2f} s "
          f"(Ray's time beyond serial / {lanes} lanes, per cell)")


if __name__ == "__main__":
    main()
