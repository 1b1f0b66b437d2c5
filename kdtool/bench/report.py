"""The bench report: report.json (machine-readable), report.md (tables), report.png (plots), console table.

Every figure in a report is measured by the run that wrote it; the report says when and where.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
from importlib import metadata
from pathlib import Path

from kdtool.io import atomic_path, write_json_atomic, write_text_atomic
from kdtool.tables import markdown_table

SCHEMA = "kdtool.bench/1"
TIMING_COLUMNS = ("artefact", "precision", "runtime", "ran on", "batch", "threads", "p50 ms", "p90 ms", "p99 ms",
                  "mean ms", "min ms", "images/s")
ACCURACY_COLUMNS = ("artefact", "precision", "runtime", "ran on", "top-1", "top-5", "drop vs student",
                    "agree teacher", "agree student", "KL teacher")
FASTEST_COLUMNS = ("artefact", "batch", "fastest", "p50 ms", "next", "next p50 ms", "speed-up")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(packages: tuple[str, ...] = ()) -> dict:
    """Where this run measured: host, CPU, GPU, and the versions of kdtool, torch, onnx, numpy and `packages`
    (the runtimes' own)."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "gpu": gpu,
        "versions": {"python": platform.python_version(),
                     **{name: _version(name) for name in dict.fromkeys(("kdtool", "torch", "onnx", "numpy", *packages))}},
    }


def fastest_runtimes(timing: list[dict]) -> list[dict]:
    """For each artefact and batch size timed on two or more runtimes: the fastest (lowest median latency),
    the next one, and how many times faster the fastest was, on this machine."""
    groups: dict[tuple, list[dict]] = {}
    for case in timing:
        groups.setdefault((case["artefact"], case["batch_size"]), []).append(case)
    rows = []
    for (artefact, batch_size), cases in groups.items():
        if len({case["runtime"] for case in cases}) < 2:
            continue
        best, following = sorted(cases, key=lambda case: case["latency_ms"]["p50"])[:2]
        rows.append({"artefact": artefact, "batch_size": batch_size, "fastest": best["runtime"],
                     "p50_ms": best["latency_ms"]["p50"], "next": following["runtime"],
                     "next_p50_ms": following["latency_ms"]["p50"],
                     "speedup": following["latency_ms"]["p50"] / best["latency_ms"]["p50"]})
    return rows


def build_report(bundle, settings, eval_set, runtimes: list[dict], timing: list[dict], accuracy: list[dict],
                 outcome, failures: list[dict], not_checked: dict[str, str], registry=None) -> dict:
    """The report as plain data (what report.json holds); `registry` (the runtimes tried) names the packages
    whose versions it records."""
    packages = tuple(name for runtime in (registry or {}).values() for name in runtime.packages)
    env = environment(packages)
    checked = sorted({row["artefact"] for row in accuracy} & {a.key for a in bundle.artefacts})
    return {
        "schema": SCHEMA,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": env["host"],
        "bundle": str(bundle.directory),
        "recipe": bundle.recipe.name,
        "environment": env,
        "settings": {
            "batch_sizes": list(settings.batch_sizes), "warmup": settings.warmup, "iters": settings.iters,
            "duration_s": settings.duration, "threads": settings.threads,
            "include_copies": settings.include_copies, "cuda_graphs": settings.cuda_graphs,
            "data": {"source": eval_set.source, "description": eval_set.description, "images": len(eval_set.labels)},
        },
        "runtimes": runtimes,
        "timing": timing,
        "fastest": fastest_runtimes(timing),
        "accuracy": accuracy,
        "skipped": outcome.skipped,
        "failed": outcome.failed,
        "gate": {
            # False when anything failed or could not run; None when nothing could be checked here
            "passed": False if failures or outcome.failed else (True if checked else None),
            "checked": checked,
            "not_checked": not_checked,
            "max_top1_drop": dict(bundle.recipe.bench.gate.max_top1_drop),
            "min_teacher_agreement_pct": bundle.recipe.bench.gate.min_teacher_agreement,
            "failures": failures,
        },
    }


def gate_verdict(gate: dict) -> str:
    """'passed for ...', 'FAILED', or 'not applied' when nothing could be checked here; names what was not checked."""
    if gate["passed"] is None:
        verdict = "gate not applied: no artefact could be checked here"
    else:
        verdict = f"gate {'passed' if gate['passed'] else 'FAILED'} for {', '.join(gate['checked']) or 'no artefact'}"
    if gate["not_checked"]:
        verdict += "; not checked here: " + "; ".join(f"{key} ({why})" for key, why in gate["not_checked"].items())
    return verdict


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _timing_cells(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for case in report["timing"]:
        latency = case["latency_ms"]
        rows.append((case["artefact"], case["precision"], case["runtime"], case["ran_on"], str(case["batch_size"]),
                     str(case["threads"]),
                     *(_fmt(latency[k], 3) for k in ("p50", "p90", "p99", "mean", "min")),
                     _fmt(case["throughput_ips"], 1)))
    return rows


def _accuracy_cells(report: dict) -> list[tuple[str, ...]]:
    return [(row["artefact"], row["precision"], row["runtime"], row.get("ran_on", "-"), _fmt(row["top1"]), _fmt(row["top5"]),
             _fmt(row.get("top1_drop")), _fmt(row.get("teacher_agreement")), _fmt(row.get("student_agreement")),
             _fmt(row.get("teacher_kl"), 4)) for row in report["accuracy"]]


def _fastest_cells(report: dict) -> list[tuple[str, ...]]:
    return [(row["artefact"], str(row["batch_size"]), row["fastest"], _fmt(row["p50_ms"], 3), row["next"],
             _fmt(row["next_p50_ms"], 3), f"{row['speedup']:.2f}x") for row in report["fastest"]]


def render_markdown(report: dict) -> str:
    """report.md: environment, timing, accuracy, gate and skipped cases as tables."""
    env, settings, gate = report["environment"], report["settings"], report["gate"]
    gpu = env["gpu"]["name"] if env["gpu"] else "none"
    amount = f"{settings['iters']} iterations" if settings["iters"] else f"{settings['duration_s']} s"
    parts = [
        f"# Bench report: {report['bundle']}",
        f"Measured {report['timestamp']} on `{report['host']}`: CPU {env['cpu']['model']} "
        f"({env['cpu']['usable_cores']} usable of {env['cpu']['logical_cores']} cores), GPU {gpu}. "
        f"{amount} per case after {settings['warmup']} warm-up, {settings['threads']} threads, "
        f"accuracy on {settings['data']['description']}.",
        "## Versions",
        markdown_table(("package", "version"), [(k, v) for k, v in env["versions"].items() if v]),
        "## Timing",
        markdown_table(TIMING_COLUMNS, _timing_cells(report)),
        "## Fastest runtime per artefact and batch size",
        "Where two or more runtimes ran an artefact: the lowest median (p50) latency on this machine, and how many "
        "times faster it was than the next.",
        markdown_table(FASTEST_COLUMNS, _fastest_cells(report)),
        "## Accuracy",
        "Top-1/top-5 and agreement in %, drop in points vs the float student (PyTorch), KL = mean KL(teacher || model).",
        markdown_table(ACCURACY_COLUMNS, _accuracy_cells(report)),
        "## Gate",
        f"**{gate_verdict(gate)}**. Limits: max top-1 drop per precision "
        f"{gate['max_top1_drop']}, min agreement with the teacher {gate['min_teacher_agreement_pct']:g} %.",
    ]
    if gate["failures"]:
        parts.append(markdown_table(("artefact", "runtime", "metric", "value", "limit"),
                                     [(f["artefact"], f["runtime"], f["metric"], _fmt(f["value"]), f["limit"])
                                      for f in gate["failures"]]))
    parts += ["## Runtimes",
              markdown_table(("runtime", "available", "reason"),
                              [(r["name"], "yes" if r["available"] else "no", r["reason"] or "") for r in report["runtimes"]])]
    if report["failed"]:
        parts += ["## Failed (could not run on a runtime that serves them)",
                  markdown_table(("artefact", "runtime", "stage", "reason"),
                                  [(f["artefact"], f["runtime"], f["stage"], f["reason"]) for f in report["failed"]])]
    if report["skipped"]:
        parts += ["## Skipped",
                  markdown_table(("artefact", "runtime", "batch", "reason"),
                                  [(s["artefact"], s["runtime"], str(s.get("batch_size", "all")), s["reason"])
                                   for s in report["skipped"]])]
    return "\n\n".join(parts) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """report.png: top-1 vs p50 latency at the smallest batch, and p50 latency vs batch size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, batch_axes = figure.subplots(1, 2)
    top1 = {(row["artefact"], row["runtime"]): row["top1"] for row in report["accuracy"]}
    smallest = min((case["batch_size"] for case in report["timing"]), default=None)
    series = list(dict.fromkeys((case["artefact"], case["runtime"]) for case in report["timing"]))
    for key in series:
        cases = sorted((c for c in report["timing"] if (c["artefact"], c["runtime"]) == key), key=lambda c: c["batch_size"])
        label = f"{key[0]} / {key[1]}"
        if key in top1:
            accuracy_axes.scatter(cases[0]["latency_ms"]["p50"], top1[key], label=label)
        batch_axes.plot([c["batch_size"] for c in cases], [c["latency_ms"]["p50"] for c in cases], marker="o", label=label)
    accuracy_axes.set(xlabel=f"p50 latency at batch {smallest} (ms)", ylabel="top-1 (%)", title="Accuracy vs latency",
                      xscale="log")
    batch_axes.set(xlabel="batch size", ylabel="p50 latency (ms)", title="Latency vs batch size", yscale="log")
    batch_axes.set_xscale("log", base=2)
    sizes = report["settings"]["batch_sizes"]
    batch_axes.set_xticks(sizes, labels=[str(size) for size in sizes])
    accuracy_axes.minorticks_off()
    batch_axes.minorticks_off()
    if series:
        accuracy_axes.legend(fontsize=8)
        batch_axes.legend(fontsize=8)
    figure.suptitle(f"{report['bundle']}: {report['timestamp']} on {report['host']}", fontsize=9)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def write_report(bundle_dir: Path, report: dict) -> None:
    """report.json, report.md and report.png into `bundle_dir`, each written atomically."""
    write_json_atomic(bundle_dir / "report.json", report)
    write_text_atomic(bundle_dir / "report.md", render_markdown(report))
    plot_report(report, bundle_dir / "report.png")


CONSOLE_TIMING = ("artefact", "runtime", "batch", "p50 ms", "p99 ms", "mean ms", "images/s")
CONSOLE_ACCURACY = ("artefact", "runtime", "top-1", "top-5", "drop vs student", "agree teacher", "KL teacher")


def _console_table(title: str, columns: tuple[str, ...], shown: tuple[str, ...], rows: list[tuple[str, ...]]):
    from rich.table import Table

    table = Table(title=title)
    picked = [columns.index(name) for name in shown]
    for name in shown:
        text = name in ("artefact", "runtime", "fastest", "next")
        table.add_column(name, no_wrap=text, justify="left" if text else "right")
    for row in rows:
        table.add_row(*(row[i] for i in picked))
    return table


def print_report(report: dict, console=None) -> None:
    """Timing and accuracy as rich tables (report.md has every column), skipped runtimes, the gate verdict."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    console.print(_console_table("Timing", TIMING_COLUMNS, CONSOLE_TIMING, _timing_cells(report)))
    if report["fastest"]:
        console.print(_console_table("Fastest runtime here", FASTEST_COLUMNS, FASTEST_COLUMNS, _fastest_cells(report)))
    console.print(_console_table("Accuracy (%)", ACCURACY_COLUMNS, CONSOLE_ACCURACY, _accuracy_cells(report)))
    for runtime in report["runtimes"]:
        if not runtime["available"]:
            console.print(f"[dim]skipped {runtime['name']}: {escape(runtime['reason'])}[/dim]")
    gate = report["gate"]
    colour = {True: "green", False: "red", None: "yellow"}[gate["passed"] if not report["failed"] else False]
    console.print(f"[{colour}]{escape(gate_verdict(gate))}[/{colour}] ({report['settings']['data']['description']})")
    console.print(f"report written to {escape(report['bundle'])}/report.{{json,md,png}} "
                  f"({report['timestamp']}, {report['host']})")
