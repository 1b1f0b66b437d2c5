"""Accuracy rows (teacher, float student, every artefact on every runtime) and the accuracy gate."""
from __future__ import annotations

import math

from kdtool.errors import CheckFailed
from kdtool.evaluate import classification_metrics
from kdtool.recipe import GateConfig
from kdtool.tables import text_table


class GateFailed(CheckFailed):
    """The accuracy gate was missed; carries the report (already written) for the caller to show."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def accuracy_row(artefact: str, precision: str, runtime: str, ran_on: str, logits, targets, teacher_logits,
                 student_logits) -> dict:
    """top1/top5, agreement (%) and mean KL to the teacher and to the float student, and the top-1 drop (points);
    `ran_on` is what really executed it (the provider a session got)."""
    metrics = classification_metrics(logits, targets, teacher_logits, prefix_reference="teacher")
    versus_student = classification_metrics(logits, targets, student_logits, prefix_reference="student")
    student_top1 = classification_metrics(student_logits, targets)["top1"]
    return {
        "artefact": artefact, "precision": precision, "runtime": runtime, "ran_on": ran_on,
        **metrics,
        "student_agreement": versus_student["student_agreement"],
        "student_kl": versus_student["student_kl"],
        "top1_drop": student_top1 - metrics["top1"],
    }


def reference_row(name: str, runtime: str, logits, targets) -> dict:
    """The row of the teacher or the float student (their logits as computed at export, or by the run)."""
    return {"artefact": name, "precision": "fp32", "runtime": runtime, **classification_metrics(logits, targets)}


def above_chance_limit(images: int, num_classes: int) -> float:
    """The top-1 (%) a model must beat to be above chance on `images` images of `num_classes` classes: chance
    plus three binomial standard deviations."""
    chance = 1 / num_classes
    return 100 * (chance + 3 * math.sqrt(chance * (1 - chance) / images))


def teacher_failures(rows: list[dict], images: int, num_classes: int) -> list[dict]:
    """A gate failure when the teacher is at chance on the evaluation data: then its labels are not what the
    models learnt (another dataset, renamed or reshuffled classes) and no agreement or drop means anything."""
    limit = above_chance_limit(images, num_classes)
    return [_failure(row, "teacher_top1_above_chance", row["top1"], f"> {limit:.2f} (chance {100 / num_classes:.2f} "
                     f"+ 3 sd on {images} images)") for row in rows if row["artefact"] == "teacher" and row["top1"] <= limit]


def gate_failures(rows: list[dict], gate: GateConfig, gated_artefacts: set[str]) -> list[dict]:
    """Every (artefact, runtime, metric) of `gated_artefacts` that misses a limit of `gate`."""
    failures = []
    min_agreement = gate.min_teacher_agreement
    for row in rows:
        if row["artefact"] not in gated_artefacts:
            continue
        max_drop = gate.max_top1_drop.get(row["precision"])
        if max_drop is not None and row["top1_drop"] > max_drop:
            failures.append(_failure(row, "top1_drop", row["top1_drop"], f"<= {max_drop:g}"))
        if row["teacher_agreement"] < min_agreement:
            failures.append(_failure(row, "teacher_agreement", row["teacher_agreement"], f">= {min_agreement:g}"))
    return failures


def _failure(row: dict, metric: str, value: float, limit: str) -> dict:
    return {"artefact": row["artefact"], "runtime": row["runtime"], "metric": metric, "value": value, "limit": limit}


def format_failures(failures: list[dict]) -> str:
    """A plain-text table of gate failures (the CheckFailed message)."""
    rows = [(f["artefact"], f["runtime"], f["metric"], f"{f['value']:.2f}", f["limit"]) for f in failures]
    table = text_table(("artefact", "runtime", "metric", "value", "limit"), rows)
    return f"accuracy gate failed ({len(failures)} check{'s' if len(failures) != 1 else ''}):\n{table}"
