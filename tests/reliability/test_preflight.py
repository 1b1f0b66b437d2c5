"""Checked before anything trains (kdtool/preflight.py): what only training used to find wrong is refused by
`distill`, `run`, `recipe check` and every cell of `kdtool sweep` alike, in one line naming key, model and
size, exit 2, with nothing printed or left behind; settings nothing reads are listed; a sweep trains one
teacher per distinct teacher and tabulates grids of any YAML value."""
from __future__ import annotations

import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from conftest import one_line_error
from kdtool.errors import KdtoolError
from kdtool.models import build_model
from kdtool.sweep import plan_sweep, run_sweep, safe_name, sweep_cells
from runs import MICRO, QUICKSTART, REPO, set_args
from test_data_faults import folder_args, image_folder

COMMANDS = [["distill"], ["run"], ["recipe", "check"]]


def refused(cli_runner, tmp_path, command, *overrides) -> str:
    """The one error line of `command` on the quickstart with MICRO and `overrides`; nothing printed before
    it, no run directory or bundle left."""
    out = tmp_path / "run"
    extra = ["--out", out] if command[0] != "recipe" else []
    result = cli_runner(*command, QUICKSTART, *set_args([*MICRO, "export.root=bundles", *overrides]), *extra)
    line = one_line_error(result)
    printed = [l for l in result.output.splitlines() if l.strip() and not l.startswith(("Error: ", "Warning: "))]
    assert not printed, f"{command} printed before refusing: {printed[:3]}"
    assert not out.exists() and not (tmp_path / "bundles").exists()
    return line


def test_a_model_that_cannot_take_the_input_size_is_refused_before_anything(tmp_path, cli_runner, fault_trials):
    """timm's ConvNeXt downsamples 16 px to 1 px before its last 2x2 stage: the kernel is larger than the map."""
    pytest.importorskip("timm")
    trials = fault_trials("preflight")
    for command in COMMANDS:
        for role in ("student", "teacher"):
            with trials.trial():
                line = refused(cli_runner, tmp_path, command, "data.image_size=16", f"{role}.name=timm:convnext_atto")
                assert f"{role} timm:convnext_atto at 16x16 inputs (data.image_size 16) cannot be run" in line, line
                assert "Kernel size can't be greater than actual input size" in line, line


# In a fresh process (the free memory a long test session keeps would blur the cap): everything imported and
# run once, then the address space capped a little above what the process uses, then `recipe check` again.
CAPPED_CHECK = """
import re, resource, sys
from click.testing import CliRunner
from kdtool.cli import cli
recipe, headroom, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
CliRunner().invoke(cli, ["recipe", "check", recipe, *args[:-4]])  # the same at 8 px, which fits
used = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10
resource.setrlimit(resource.RLIMIT_AS, (used + (headroom << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
result = CliRunner().invoke(cli, ["recipe", "check", recipe, *args])
print(result.output, end="")
sys.exit(result.exit_code)
"""


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_AS") or not Path("/proc/self/status").exists(),
                    reason="needs Linux's RLIMIT_AS and /proc")
@pytest.mark.parametrize("headroom_mib,doing", [(40, "building it"), (300, "one batch of 2")])
def test_a_model_too_large_for_memory_is_one_line(tmp_path, fault_trials, headroom_mib, doing):
    """ResNet-50 at 1024 px on 8x8 images: 100 MB of weights, 134 MB per early feature map. With the address
    space capped a little above what the process uses, its weights or its first batch do not fit."""
    root = image_folder(tmp_path / "images", bad=False)
    args = [*folder_args(root), "--set", "student.name=resnet50", "--set", "data.image_size=1024"]
    with fault_trials("preflight").trial():
        result = subprocess.run([sys.executable, "-c", CAPPED_CHECK, str(QUICKSTART), str(headroom_mib), *args],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = result.stdout.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stdout
        line = lines[0]
        assert re.search(rf"(student resnet50|teacher resnet14) at 1024x1024 inputs \(data.image_size 1024\) does "
                         rf"not fit in memory \({doing}\)", line), line


BAD_RECIPES = [
    (["augment.jda.policy=digit"], "augment.jda.policy: unknown JDA policy 'digit' (did you mean 'digits'?)"),
    # The teacher has weights, so its JDA section is unused: still refused, as the same name would be elsewhere.
    (["teacher.weights=teacher.safetensors", "teacher.augment.jda.policy=nosuch"],
     "teacher.augment.jda.policy: unknown JDA policy 'nosuch'"),
    (["teacher.augment.jda.policy=cifar1000"], "teacher.augment.jda.policy: unknown JDA policy 'cifar1000'"),
    (["method.name=dkd", "methods.dkd.warmup_epochs=20"], "method.warmup_epochs: 20 is beyond train.epochs (3)"),
    (["method.name=dkd", "method.warmup_epochs=500"], "method.warmup_epochs: 500 is beyond train.epochs (3)"),
    (["train.schedule.warmup_epochs=4"], "train.schedule.warmup_epochs: 4 is beyond epochs (3)"),
    (["teacher.train.schedule.warmup_epochs=2.5"], "teacher.train.schedule.warmup_epochs: 2.5 is beyond epochs (1)"),
    (["student.normalization={mean: [0.5, 0.5], std: [0.2, 0.2, 0.2]}"], "student.normalization.mean: list should"),
    (["teacher.normalization={mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0]}"], "teacher.normalization.std.2: input"),
    (["student.normalization={mean: [0.5, 0.5, 0.5]}"], "student.normalization.std: required key is missing"),
    (["student.name=nosuchnet"], "unknown model 'nosuchnet'"),
    (["student.name=timm:../x"], "'timm:../x' is not a timm model name"),
    (["teacher.name=timm:resnet18.nosuchtag"], "timm model resnet18 has no pretrained tag 'nosuchtag'"),
    (["data.batch_size=4096"], "data.batch_size: 4096 is larger than the"),
    (["teacher.weights=missing.safetensors"], "checkpoint not found: missing.safetensors"),
]


def test_recipe_check_refuses_what_distill_refuses_in_the_same_words(tmp_path, cli_runner, fault_trials):
    """`recipe check` runs distill's checks, prints nothing but the error, and names the recipe's own keys."""
    save_file(build_model("resnet8", 10).state_dict(), str(tmp_path / "teacher.safetensors"))
    trials = fault_trials("preflight")
    for overrides, named in BAD_RECIPES:
        with trials.trial():
            if any("timm:" in o for o in overrides):
                pytest.importorskip("timm")
            lines = {refused(cli_runner, tmp_path, command, *overrides) for command in COMMANDS}
            assert len(lines) == 1, lines  # the same line from every command
            line = lines.pop()
            assert named in line and ".values." not in line, line


def test_settings_nothing_reads_are_listed_and_warned_about(tmp_path, cli_runner, fault_trials):
    save_file(build_model("resnet8", 10).state_dict(), str(tmp_path / "teacher.safetensors"))
    unused = ["teacher.weights=teacher.safetensors", "teacher.train.epochs=40", "augment.jda.policy=null",
              "augment.jda.views=2", "train.schedule.milestones=[2]"]
    expected = ["teacher.train: the teacher has weights", "augment.jda.views: augment.jda.policy is null",
                "train.schedule.milestones: train.schedule.name is cosine"]
    with fault_trials("preflight").trial():
        result = cli_runner("recipe", "check", QUICKSTART, *set_args([*MICRO, *unused]))
        assert result.exit_code == 0, result.output
        comments = result.output.split("# set, but nothing reads them:")[1]
        assert all(f"#   {note}" in comments for note in expected), comments
        assert yaml.safe_load(result.output)["teacher"]["train"]["epochs"] == 40  # still the whole recipe
    with fault_trials("preflight").trial():
        result = cli_runner("distill", QUICKSTART, *set_args([*MICRO, *unused]), "--out", tmp_path / "run")
        assert result.exit_code == 0, result.output
        assert all(f"Warning: unused setting {note}" in result.output for note in expected), result.output
    with fault_trials("preflight").trial():  # the quickstart as shipped reads everything it sets
        assert "nothing reads" not in cli_runner("recipe", "check", QUICKSTART).output


def test_a_run_refused_at_its_first_batch_leaves_nothing_behind(tmp_path, cli_runner, fault_trials):
    """An unreadable image is found by the loader, after the run directory was made: it is removed again,
    so the corrected retry needs no --overwrite; a run replaced with --overwrite is left empty."""
    root = image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    with fault_trials("preflight").trial():
        line = one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root), "--out", run_dir))
        assert "unreadable image" in line and not run_dir.exists(), line
        retry = cli_runner("distill", QUICKSTART, *folder_args(root, "--set", "data.bad_images=skip"), "--out", run_dir)
        assert retry.exit_code == 0, retry.output
    with fault_trials("preflight").trial():
        one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root), "--out", run_dir, "--overwrite"))
        assert run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".kdtool-run", ".lock"}
        retry = cli_runner("distill", QUICKSTART, *folder_args(root, "--set", "data.bad_images=skip"), "--out", run_dir)
        assert retry.exit_code == 0, retry.output


# ------------------------------------------------------------------ sweeps
def sweep_args(out, *grid: str):
    return ["sweep", QUICKSTART, *[a for g in grid for a in ("--grid", g)], *set_args(MICRO), "--out", out,
            "--no-progress"]


def test_every_sweep_cell_is_tried_before_any_trains(tmp_path, cli_runner, fault_trials):
    pytest.importorskip("timm")
    out = tmp_path / "sweep"
    cases = [
        (["student.name=resnet8,timm:convnext_atto"],
         "student timm:convnext_atto at 8x8 inputs (data.image_size 8) cannot be run"),
        (["teacher.name=resnet8,timm:convnext_atto"], "teacher timm:convnext_atto at 8x8 inputs"),
        (["method.name=kd,dkd", "methods.dkd.warmup_epochs=1,20"], "method.warmup_epochs: 20 is beyond train.epochs (3)"),
        (["teacher.augment.jda.policy=null,nosuch"], "unknown JDA policy 'nosuch'"),
    ]
    trials = fault_trials("preflight")
    for grid, named in cases:
        with trials.trial():
            line = one_line_error(cli_runner(*sweep_args(out, *grid)))
            assert line.startswith("Error: sweep cell ") and named in line, line
            assert not out.exists()


def test_a_grid_of_mappings_and_lists_is_run_and_tabulated(tmp_path, fault_trials):
    grid = {"student.normalization": [None, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}],
            "train.schedule.milestones": [[1, 2]]}
    with fault_trials("preflight").trial():
        rows = run_sweep(QUICKSTART, grid, seeds=1, overrides=[*MICRO, "train.epochs=2", "train.schedule.name=multistep"],
                         out=tmp_path / "sweep", progress=False)
        assert len(rows) == 2 and all(row["student_val_top1"] is not None for row in rows)
        table = (tmp_path / "sweep" / "table.md").read_text()
        assert '{"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}' in table and "[1, 2]" in table, table
        for row in rows:
            saved = yaml.safe_load(open(f"{row['run_dir']}/recipe.yaml"))
            assert yaml.safe_load(row["train.schedule.milestones"]) == saved["train"]["schedule"]["milestones"]


def test_a_teacher_is_trained_again_only_when_the_resolved_teacher_changes(tmp_path, fault_trials):
    """MICRO's teacher trains 1 epoch and the quickstart's teacher sees no views: overrides that say so change
    nothing and share the base teacher; each real change gets its own, named by what it changes."""
    cases = [
        ({"teacher.train.epochs": [1, 2]}, {"teacher", "teacher,teacher.train.epochs=2"}),
        ({"teacher.augment.jda.policy": [None, "digits"]},
         {"teacher", safe_name(["teacher", 'teacher.augment.jda.policy="digits"'])}),
        ({"t": {"same": {"teacher.train.epochs": 1.0}, "default": {"teacher.augment.jda.p": None}}}, {"teacher"}),
        ({"method.name": ["kd", "ccd"]}, {"teacher"}),
    ]
    trials = fault_trials("preflight")
    for grid, teachers in cases:
        with trials.trial():
            plan = plan_sweep(QUICKSTART, grid, 2, MICRO, tmp_path / "home")
            assert {directory.name for directory in plan.teachers} == teachers
            assert len({recipe.teacher.weights for recipe in plan.recipes}) == len(teachers)


def test_what_a_killed_sweep_left_broken_is_found_before_training_with_advice_a_sweep_can_follow(
        tmp_path, cli_runner, fault_trials):
    out = tmp_path / "sweep"
    cells = sweep_cells({"method.name": ["kd", "ccd"]}, 1, 0)
    trials = fault_trials("preflight")
    for broken in (out / "teacher", out / cells[1].name):
        with trials.trial():
            broken.mkdir(parents=True)
            (broken / "last").symlink_to("checkpoints/epoch-0001")  # the checkpoint it named is gone
            line = one_line_error(cli_runner(*sweep_args(out, "method.name=kd,ccd")))
            assert f"remove {broken}" in line and "--overwrite" not in line, line
            assert not (out / cells[0].name).exists() and not (out / "teacher" / "checkpoints").exists()
            (broken / "last").unlink()


def test_seeds_past_the_last_seed_are_named(tmp_path, fault_trials):
    with fault_trials("preflight").trial(), pytest.raises(KdtoolError, match=r"sweep cell .*seed=4294967296: .*seed"):
        plan_sweep(QUICKSTART, {"method.name": ["kd"]}, 2, [*MICRO, "seed=4294967295"], tmp_path)
