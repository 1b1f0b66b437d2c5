"""The reliability table: each fault, how many trials its test runs, and the test.

Every test named here runs `trials` trials and fails unless each one survives with nothing lost, so
a row of the table stands only while its test passes. docs/reliability.md holds `render()`'s output
(`python tests/reliability/figures.py` prints it; test_figures.py checks the two agree).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    fault: str
    trials: int
    expected: str
    test: str


FAULTS = {
    "sigkill": Fault("`kdtool distill` killed with SIGKILL at a random point (teacher or student, mid-epoch or "
                     "mid-checkpoint), with a half-written checkpoint and link left beside it", 6,
                     "`--resume` finds a valid `last`; final metrics and weights equal an uninterrupted run's",
                     "test_kill.py::test_sigkill_at_random_points_then_resume"),
    "signal_cli": Fault("`kdtool distill` sent SIGINT / SIGTERM", 2,
                        "saves first; one line naming where it stopped, exit 130 / 143; `--resume` ends equal",
                        "test_kill.py::test_sigint_and_sigterm_stop_cleanly"),
    "signal_fit": Fault("SIGINT / SIGTERM at a chosen step (mid-epoch, mid-accumulation, epoch end), with dropout", 4,
                        "a mid-epoch checkpoint; resuming gives bit-identical metrics and weights",
                        "test_interrupt.py::test_signal_saves_then_resume_is_exact"),
    "nan": Fault("loss becomes NaN/inf (absurd learning rate; a loss turning NaN in epoch 2)", 2,
                 "exit 1 naming the epoch and step; the last good checkpoint kept and loadable",
                 "test_kill.py::test_non_finite_loss_keeps_the_last_good_checkpoint"),
    "lock": Fault("two `kdtool distill` on one run directory", 1,
                  "the second refused, exit 2; the first finishes equal to a lone run",
                  "test_kill.py::test_second_process_on_a_run_dir_is_refused"),
    "corrupt": Fault("corrupt or foreign files: truncated safetensors, checkpoint of another architecture, truncated "
                     "ONNX, manifest missing, manifest naming a missing artefact, engine of another TensorRT version", 6,
                     "exit 2 with one line naming the file", "test_corrupt_files.py"),
    "recipe_fuzz": Fault("fuzzed recipes: wrong types, missing/extra keys, unicode, huge numbers, empty and binary files",
                         152, "never a traceback; exit 0, or exit 2 naming the key or file",
                         "test_recipe_fuzz.py"),
    "data": Fault("data faults: unreadable/truncated images (fail and skip), empty class folder, label out of range", 4,
                  "fail: exit 2 naming the file; skip: trains, `skipped_images` in metrics.jsonl; exit 2 naming "
                  "the folder / file and label", "test_data_faults.py"),
    "disk_full": Fault("disk full while writing a checkpoint (file-size limit; a full 4 MiB tmpfs where mounting is "
                       "allowed) and while writing a bundle", 3,
                       "exit 2, one line; the previous `last` / bundle intact; `--resume` ends equal",
                       "test_disk_full.py"),
}


def render() -> str:
    rows = ["| fault | trials | survived, nothing lost | expected outcome | test |", "|---|---|---|---|---|"]
    rows += [f"| {f.fault} | {f.trials} | {f.trials} | {f.expected} | `tests/reliability/{f.test}` |" for f in FAULTS.values()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
