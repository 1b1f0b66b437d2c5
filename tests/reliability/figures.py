"""The reliability table: each fault family, the trials its tests ran, and how many survived, as counted.

Counting. A trial is one attempt at a fault (one kill, one corrupt file, one fuzzed recipe). Tests
report trials through the `fault_trials` fixture (tests/reliability/conftest.py):

    def test_corrupt_manifest(fault_trials, tmp_path):
        trials = fault_trials("manifest_fuzz")        # a key of FAULTS
        for case in CASES:
            with trials.trial():                      # survived unless the block raises
                ...                                   # do the damage, check the promise with asserts

A `with trials.trial()` block that raises counts as run and not survived (the test fails too); a
pytest.skip inside it counts as neither. A test of a family (matched by `Fault.test`) that records no
trial itself counts as one trial: survived when it passes. Skipped tests are listed, not counted.

Rendering. After a session that ran every family (nothing deselected), tests/reliability/conftest.py
writes the counts to `.pytest_cache/d/kdtool-reliability/last_full_run.json`;
`python tests/reliability/figures.py` renders that file as the table docs/reliability.md shows, and
test_figures.py (run last) fails when the page and the counts of a full run disagree.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORD_DIR = "kdtool-reliability"  # under pytest's cache directory (pytest's Cache.mkdir)
RECORD_FILE = "last_full_run.json"
SKIPPED_PREFIX = "Skipped where these counts were taken:"


@dataclass(frozen=True)
class Fault:
    fault: str
    expected: str
    test: str  # test file, or file::function, under tests/reliability/


FAULTS = {
    "sigkill": Fault("`kdtool distill` killed with SIGKILL at a random point (teacher or student, mid-epoch or "
                     "mid-checkpoint), with a half-written checkpoint and link left beside it",
                     "`--resume` finds a valid `last`; final metrics and weights equal an uninterrupted run's",
                     "test_kill.py::test_sigkill_at_random_points_then_resume"),
    "signal_cli": Fault("`kdtool distill` sent SIGINT / SIGTERM",
                        "saves first; one line naming where it stopped, exit 130 / 143; `--resume` ends equal",
                        "test_kill.py::test_sigint_and_sigterm_stop_cleanly"),
    "signal_fit": Fault("SIGINT / SIGTERM at a chosen step (mid-epoch, mid-accumulation, epoch end), with dropout",
                        "a mid-epoch checkpoint; resuming gives bit-identical metrics and weights",
                        "test_interrupt.py::test_signal_saves_then_resume_is_exact"),
    "nan": Fault("loss becomes NaN/inf (absurd learning rate; a loss turning NaN in epoch 2)",
                 "exit 1 naming the epoch and step; the last good checkpoint kept and loadable",
                 "test_kill.py::test_non_finite_loss_keeps_the_last_good_checkpoint"),
    "lock": Fault("two `kdtool distill` on one run directory",
                  "the second refused, exit 2; the first finishes equal to a lone run",
                  "test_kill.py::test_second_process_on_a_run_dir_is_refused"),
    "lock_link": Fault("a symbolic link (to a user's file, dangling, to a directory) where a run's lock file goes; "
                       "a lock another process holds",
                       "refused with one line naming the run directory, exit 2; the link's target neither written "
                       "nor created", "test_lock.py"),
    "corrupt": Fault("corrupt or foreign files: truncated safetensors, checkpoint of another architecture, truncated "
                     "ONNX, manifest missing, manifest naming a missing artefact, engine of another TensorRT version",
                     "exit 2 with one line naming the file", "test_corrupt_files.py"),
    "recipe_fuzz": Fault("fuzzed recipes: wrong types, missing/extra keys, unicode, huge numbers, NaN/inf, hostile "
                         "values (seeds, opsets, names, batch sizes), alias bombs, recursive aliases, deep nesting, "
                         "empty and binary files",
                         "never a traceback; exit 0, or exit 2 naming the key or file", "test_recipe_fuzz.py"),
    "data": Fault("data faults: unreadable/truncated images (fail and skip), decompression bombs, images over "
                  "kdtool's per-image pixel cap (either JDA view path), hostile JPEGs decoded on the accelerator "
                  "(no scan, cut short, oversize header, junk; fail and skip), data.decode where it has no effect, empty class "
                  "folder, label out of range, directory links repeating a class, CIFAR-100 pickles that would run "
                  "code, splits that leave a class out, out-of-range split seeds",
                  "fail: exit 2 naming the file; skip: trains, `skipped_images` in metrics.jsonl; exit 2 naming "
                  "the folder / file and label", "test_data_faults.py"),
    "disk_full": Fault("disk full while writing a checkpoint (file-size limit; a full 4 MiB tmpfs where mounting is "
                       "allowed) and while writing a bundle",
                       "exit 2, one line; the previous `last` / bundle intact; `--resume` ends equal",
                       "test_disk_full.py"),
    "sweep": Fault("sweeps: a value given twice, invalid or unbuildable cells, cell names that sanitise alike, "
                   "`--out` onto a run or a user's directory, a stale cell of another recipe, malformed spec files",
                   "refused before any training with one line naming the culprit, exit 2; nothing of the user's "
                   "touched", "test_sweep_faults.py"),
    "sweep_worker_kill": Fault("a Ray worker SIGKILLed in the middle of a sweep cell (local Ray, 2 CPUs)",
                               "Ray runs the cell again; it resumes from the cell's checkpoint and ends equal to the "
                               "serial executor's cell; the table equals the serial table",
                               "test_sweep_executors.py::test_a_worker_killed_mid_cell_is_retried_and_resumes"),
    "sweep_cell_fails": Fault("a sweep cell that fails while training (diverging loss), on the serial and the Ray "
                              "executor; the ray executor without Ray installed",
                              "the cell named with its one-line reason in table.md and results.csv, the others "
                              "finish, table/CSV/plot written, exit 1; no Ray: one line naming the extra, exit 2",
                              "test_sweep_executors.py::test_a_failing_cell_is_named_while_the_others_finish"),
    "sweep_ctrl_c": Fault("Ctrl-C (SIGINT) to `kdtool sweep --executor ray` while cells run",
                          "outstanding tasks cancelled, exit 130 in one line; finished cells intact and reused by "
                          "the next run", "test_sweep_executors.py::test_ctrl_c_cancels_outstanding_cells_and_keeps_finished_ones"),
    "rank_sigterm": Fault("SIGTERM to every rank of `torchrun --nproc_per_node 2 -m kdtool.cli distill` (and to "
                          "torchrun), as a scheduler's pre-emption sends it, in the teacher's and the student's stage",
                          "one checkpoint at the step all ranks agreed on, one stop line, each rank exits 143; "
                          "`--resume` on two ranks ends bit-identical to an uninterrupted two-rank run",
                          "test_ranks.py::test_sigterm_to_every_rank_saves_once_and_resume_ends_equal"),
    "rank_sigkill": Fault("one rank of a two-rank `kdtool distill` SIGKILLed",
                          "the job ends within 60 s (no collective hang); `--resume` ends bit-identical to an "
                          "uninterrupted two-rank run", "test_ranks.py::test_sigkill_of_one_rank_ends_the_job_quickly_and_resume_continues"),
    "weights": Fault("bad weights files as `teacher.weights` / `student.weights`: empty, truncated, random bytes, "
                     "pickled code (torch zip, raw, under a .safetensors name), non-tensors, NaN weights, a FIFO, a "
                     "directory without a checkpoint, another class count or architecture",
                     "exit 2 with one line naming the file; no code from the file runs", "test_weights_files.py"),
    "ownership": Fault("`--overwrite`, `--out`, `--resume` and checkpoint rotation aimed at what kdtool did not make: "
                       "the working directory, its parents, home, a user's directory with a forged run marker, a "
                       "symlinked run or `checkpoints/`, a dangling `last`, a run without `last`, `max_steps` on "
                       "diverged weights, `kdtool run --resume` onto an existing bundle, hostile `--seed`s",
                       "refused with one line, exit 2 (1 for diverged weights); the user's files and `best` untouched",
                       "test_run_ownership.py"),
    "bundle_ownership": Fault("`kdtool export` aimed at the working directory, its parents, home, user directories, "
                              "a foreign manifest, symlinks, names and roots escaping `export/`",
                              "refused with one line, exit 2; nothing of the user's touched",
                              "test_bundle_faults.py::test_export_replaces_only_a_kdtool_bundle"),
    "bundle_lock": Fault("`kdtool bench` racing `kdtool export --overwrite` on one bundle (both orders, in a "
                         "subprocess); leftovers of killed writes (`.partial`, `.old`, `.lock`), kdtool's and not",
                         "the second refused, exit 2; leftovers never read as bundles, only kdtool's cleaned",
                         "test_bundle_faults.py"),
    "bundle_bench": Fault("bundles that do not fit their manifest (names, shapes, class counts, kinds, paths "
                          "escaping the bundle, hashes, engine targets) and artefacts that cannot run",
                          "exit 2 in one line naming the bundle; an unloadable artefact exits 1; never 'gate passed'",
                          "test_bundle_faults.py::test_bench_refuses_bundles_that_do_not_fit_their_manifest"),
    "bench_data": Fault("`kdtool bench --data DIR` given what the bundle was not made from (a missing DIR, a file, "
                        "another dataset kind, renamed or missing class folders, the classes' images swapped) or an "
                        "embedded dataset's bundle; reference arrays whose .npy header claims 10**12 labels, another "
                        "dtype or order, or whose labels no longer match the teacher",
                        "refused with one line naming DIR or the array, exit 2; a teacher at chance fails the gate, "
                        "exit 1; otherwise every image under DIR is read",
                        "test_bench_inputs.py"),
    "artefact_constraints": Fault("the TensorRT INT8 artefact edited against TensorRT's Q/DQ constraints: a non-zero "
                                  "or uint8 activation zero point, weights quantised along their input channels, "
                                  "per-channel activation scales",
                                  "refused before it is judged, one line naming the artefact and the node, exit 2",
                                  "test_bench_inputs.py::test_tensorrt_int8_constraints_checked_before_judging"),
    "manifest_fuzz": Fault("fuzzed manifests (hypothesis: any JSON value at any key path, deletions, extra keys) and "
                           "broken manifest bytes, deep nesting, huge documents",
                           "never a traceback; exit 0, 1 (report written) or 2 in one line naming the manifest",
                           "test_manifest_fuzz.py"),
    "unpickle": Fault("a pickle whose unpickling would create a file, planted as the recipe, teacher/student weights "
                      "(.pt zip, raw .pth, named .safetensors), a checkpoint's weights or state given as weights, to "
                      "export and to `--resume`, CIFAR-100's files, a bundle's manifest and reference arrays, the "
                      "INT8 calibration cache, TensorRT's timing cache and engine",
                      "the file never runs code (no marker file); exit 2 with one line", "test_no_unpickle.py"),
    "preflight": Fault("recipes that only training would have found wrong: a timm teacher or student that cannot "
                       "take the input size, a model or data too large for memory, an unknown JDA policy (used "
                       "or not), warm-up past the last epoch, settings nothing reads, a missing pretrained tag or "
                       "download, `timm:../x`; the same in every sweep cell (also grids of mappings, a teacher "
                       "override that changes nothing, cells and teachers a killed run left broken); bad data "
                       "found by the first batch",
                       "`distill`, `run`, `recipe check` and `sweep` refuse it alike before anything trains: one "
                       "line naming key, model and size, exit 2, nothing printed or left behind (a retry needs no "
                       "`--overwrite`); unused settings listed; one teacher per distinct teacher",
                       "test_preflight.py"),
    "cli_errors": Fault("careless command lines: unknown commands and options, missing arguments, bad option "
                        "values (`--seeds 0`, huge `--seeds` or grids), a recipe or spec that is a directory, a "
                        "FIFO, a broken link or unreadable, a sweep spec given with `--grid`",
                        "one line naming the option or path, exit 2; no usage block, no traceback, nothing read "
                        "from a FIFO", "test_cli_errors.py"),
}


class TrialCounter:
    """Counts the trials of one fault family in one test (see the module docstring)."""

    def __init__(self, family: str):
        if family not in FAULTS:
            raise KeyError(f"unknown fault family {family!r}; add it to FAULTS in tests/reliability/figures.py")
        self.family, self.run, self.survived = family, 0, 0

    @contextlib.contextmanager
    def trial(self):
        """One trial: survived when the block completes; a pytest.skip inside counts as no trial."""
        try:
            yield
        except pytest.skip.Exception:
            raise
        except BaseException:
            self.run += 1
            raise
        self.run += 1
        self.survived += 1


@dataclass
class Record:
    """What a session observed: per family [run, survived], skipped test ids, whether anything was deselected."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    deselected: bool = False

    def add(self, family: str, run: int, survived: int) -> None:
        totals = self.counts.setdefault(family, [0, 0])
        totals[0] += run
        totals[1] += survived

    def observe(self, report, counters: list[TrialCounter]) -> None:
        """Count the outcome of one test (its call's report, or its setup's when that failed or skipped)
        and the counters it used.

        An expected failure (xfail) is a trial that did not survive; a skipped test is listed, not counted.
        """
        test_id = short_id(report.nodeid)
        if test_id.startswith("test_figures.py"):
            return  # the suite's own checks, not a fault
        skipped = report.skipped and not hasattr(report, "wasxfail")
        if skipped and test_id not in self.skipped:
            self.skipped.append(test_id)
        for counter in counters:
            self.add(counter.family, counter.run, counter.survived)
        family = family_of(test_id)
        if family and not counters and not skipped:
            self.add(family, 1, int(report.passed))

    def missing(self) -> list[str]:
        """Families with no trial counted and no test skipped in this session."""
        skipped_families = {family_of(test_id) for test_id in self.skipped}
        return [key for key in FAULTS if key not in self.counts and key not in skipped_families]

    def is_full(self) -> bool:
        return not self.deselected and not self.missing()

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts, "skipped": sorted(self.skipped)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        data = json.loads(text)
        return cls({k: list(v) for k, v in data["counts"].items()}, list(data["skipped"]))


def short_id(nodeid: str) -> str:
    """A pytest node id relative to tests/reliability/."""
    return nodeid.split("tests/reliability/", 1)[-1]


def family_of(test_id: str) -> Optional[str]:
    """The family whose `test` is the longest prefix of `test_id` (a short node id), or None."""
    def matches(test: str) -> bool:  # a file's tests, or a function's parametrized cases
        return test_id == test or test_id.startswith(test + ("[" if "::" in test else "::"))
    candidates = [key for key, fault in FAULTS.items() if matches(fault.test)]
    return max(candidates, key=lambda key: len(FAULTS[key].test), default=None)


def render(record: Record) -> str:
    """The table (and the tests skipped where the counts were taken) for docs/reliability.md."""
    rows = ["| fault | trials | survived, nothing lost | expected outcome | test |", "|---|---|---|---|---|"]
    for key, fault in FAULTS.items():
        run, survived = record.counts.get(key, (0, 0))
        rows.append(f"| {fault.fault} | {run} | {survived} | {fault.expected} | `tests/reliability/{fault.test}` |")
    skipped = ", ".join(f"`{test_id}`" for test_id in sorted(record.skipped)) or "none"
    return "\n".join(rows) + f"\n\n{SKIPPED_PREFIX} {skipped}.\n"


def docs_skipped(text: str) -> set[str]:
    """The skipped test ids a rendered page lists."""
    for line in text.splitlines():
        if line.startswith(SKIPPED_PREFIX):
            return {part.strip(" `.,") for part in line[len(SKIPPED_PREFIX):].split("`, `")} - {"none", ""}
    return set()


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else REPO / ".pytest_cache" / "d" / RECORD_DIR / RECORD_FILE
    if not path.is_file():
        print(f"no full run recorded at {path}: run `python -m pytest tests/reliability` first", file=sys.stderr)
        return 2
    print(render(Record.from_json(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
