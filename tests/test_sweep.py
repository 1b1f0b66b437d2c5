"""`kdtool sweep`: grid parsing, shared teachers, reports, resume, bad keys, spec files."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import kdtool.train as train_module
from kdtool.cli import cli
from kdtool.errors import KdtoolError
from kdtool.sweep import load_spec, parse_grid, run_spec, run_sweep, safe_name, summarise, sweep_cells

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
TINY = ("teacher.name=resnet8", "train.epochs=1", "teacher.train.epochs=1", "data.image_size=8",
        "data.train_fraction=0.1", "data.batch_size=16")
GRID = {"method.name": ["kd", "ccd"], "augment.jda.p": [0.3]}


def test_parse_grid_types_values_as_yaml():
    grid = parse_grid(["method.name=vanilla,kd", "augment.jda.p=0,0.3", "runtime.channels_last=true"])
    assert grid == {"method.name": ["vanilla", "kd"], "augment.jda.p": [0, 0.3], "runtime.channels_last": [True]}
    with pytest.raises(KdtoolError, match="expected key.path=value1,value2"):
        parse_grid(["method.name"])
    with pytest.raises(KdtoolError, match="given twice"):
        parse_grid(["seed=1", "seed=2"])


def test_cells_cover_the_grid_times_seeds_with_readable_names():
    cells = sweep_cells({"method.name": ["kd", "ccd"], "augment.jda.p": [0, 0.3]}, seeds=3, base_seed=5)
    assert len(cells) == 12
    assert {c.seed for c in cells} == {5, 6, 7}
    assert cells[1].name == "method.name=kd,augment.jda.p=0,seed=6"
    assert cells[1].overrides == ['method.name="kd"', "augment.jda.p=0", "seed=6"]
    assert cells[1].values == {"method.name": "kd", "augment.jda.p": 0}


def test_named_variants_set_several_keys_together():
    grid = {"data": {"10%": {"data.train_fraction": 0.1, "data.batch_size": 16}},
            "method": {"kd": {"method.name": "kd"}, "kd+jda": {"method.name": "kd", "augment.jda.policy": "digits"}}}
    cells = sweep_cells(grid, seeds=1, base_seed=0)
    assert [c.values for c in cells] == [{"data": "10%", "method": "kd"}, {"data": "10%", "method": "kd+jda"}]
    assert cells[1].overrides == ["data.train_fraction=0.1", "data.batch_size=16", 'method.name="kd"',
                                  'augment.jda.policy="digits"', "seed=0"]
    assert cells[0].name.startswith("data=10_,method=kd,seed=0~")  # "%" is no file-name character
    assert len({c.name for c in cells}) == 2


def test_names_stay_readable_when_they_can_and_unique_always():
    assert safe_name(["method.name=kd", "seed=0"]) == "method.name=kd,seed=0"
    slash, underscore = safe_name(["export.root=a/b"]), safe_name(["export.root=a_b"])
    assert slash != underscore and underscore == "export.root=a_b" and slash.startswith("export.root=a_b~")
    assert len(safe_name(["x=" + "y" * 500])) < 150


def test_summarise_means_and_std():
    rows = [{"method.name": "kd", "seed": s, "student_val_top1": v, "student_val_teacher_agreement": None,
             "run_dir": "x"} for s, v in enumerate([80.0, 82.0])]
    (entry,) = summarise(rows)
    assert entry["n"] == 2 and entry["student_val_top1_mean"] == 81.0
    assert entry["student_val_top1_std"] == pytest.approx(2**0.5)
    assert entry["student_val_teacher_agreement_mean"] is None


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    rows = run_sweep(RECIPE, GRID, seeds=2, overrides=TINY, out=out, progress=False)
    return out, rows


def test_sweep_writes_one_row_per_cell_and_the_reports(finished_sweep):
    out, rows = finished_sweep
    assert len(rows) == 4
    with open(out / "results.csv") as handle:
        results = list(csv.DictReader(handle))
    assert len(results) == 4 and {r["method.name"] for r in results} == {"kd", "ccd"}
    assert all(0 <= float(r["student_val_top1"]) <= 100 for r in results)
    with open(out / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(t["method.name"], t["n"]) for t in table] == [("kd", "2"), ("ccd", "2")]
    markdown = (out / "table.md").read_text()
    assert "student top-1 (%)" in markdown and "teacher top-1 (%)" in markdown and markdown.count("±") == 6
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_teacher_is_trained_once_and_shared(finished_sweep):
    out, rows = finished_sweep
    assert sorted(p.name for p in out.rglob("teacher") if p.is_dir()) == ["teacher"]
    assert (out / "teacher" / "best").exists()
    for row in rows:
        cell_recipe = yaml.safe_load((Path(row["run_dir"]) / "recipe.yaml").read_text())
        assert Path(cell_recipe["teacher"]["weights"]) == (out / "teacher" / "best").absolute()
        assert not (Path(row["run_dir"]) / "teacher").exists()


def test_rerun_skips_finished_cells_and_resumes_an_unfinished_one(finished_sweep, monkeypatch):
    out, rows = finished_sweep
    calls = []
    real_distill = train_module.distill

    def counting_distill(recipe, run_dir, **kwargs):
        calls.append((Path(run_dir).name, kwargs["resume"]))
        return real_distill(recipe, run_dir, **kwargs)

    monkeypatch.setattr(train_module, "distill", counting_distill)
    real_fit = train_module.fit

    def fit_students_only(*args, **kwargs):
        assert kwargs["label"] != "teacher", "the teacher was trained again"
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit", fit_students_only)
    unfinished = Path(rows[2]["run_dir"])
    (unfinished / "summary.json").unlink()
    again = run_sweep(RECIPE, GRID, seeds=2, overrides=TINY, out=out, progress=False)
    assert calls == [(unfinished.name, True)]
    assert [r["student_val_top1"] for r in again] == [r["student_val_top1"] for r in rows]


@pytest.mark.parametrize("grid,culprit", [
    ("method.nme=kd", "method.nme"),
    ("augment.jda.p=0,7", "augment.jda.p"),
    ("data.split_seed=1,2", "data.split_seed"),
    ("data.val_fraction=0.1,0.2", "data.val_fraction"),
    ("seed=1,2", "seed"),
])
def test_bad_grid_key_exits_2_naming_it(tmp_path, grid, culprit):
    result = CliRunner().invoke(cli, ["sweep", str(RECIPE), "--grid", grid, "--out", str(tmp_path / "s"),
                                      "--no-progress"])
    assert result.exit_code == 2, result.output
    assert culprit in result.output
    assert not (tmp_path / "s" / "teacher").exists()


SPECS = sorted((RECIPE.parent / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_specs_resolve_and_build_every_cell(spec_path, tmp_path):
    from kdtool.sweep import check_plan, plan_sweep

    spec = load_spec(spec_path)
    assert spec.seeds >= 3 and spec.teacher_home == "runs/findings/teacher" and spec.title
    plan = plan_sweep(spec.recipe_path(spec_path), spec.grid, spec.seeds, spec.overrides(), tmp_path / "teacher")
    check_plan(plan)
    assert {recipe.data.image_size for recipe in plan.recipes} == {16}
    assert all(r.data.train_fraction == 1.0 for r in plan.teachers.values())  # teachers see the full training set


def test_specs_share_one_teacher_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY)}
    for name, grid in (("one", {"method.name": ["kd"]}), ("two", {"method": {"ccd": {"method.name": "ccd"}}})):
        spec = {"recipe": str(RECIPE), "out": f"sweeps/{name}", "teacher_home": "teachers", "set": fixed, "grid": grid}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    calls = []
    real_fit = train_module.fit
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: calls.append(k["label"]) or real_fit(*a, **k))
    first = run_spec(tmp_path / "one.yaml", progress=False)
    second = run_spec(tmp_path / "two.yaml", progress=False)
    assert calls == ["teacher", "student", "student"]
    assert first[0]["teacher_val_top1"] == second[0]["teacher_val_top1"] is not None
    assert second[0]["method"] == "ccd" and Path(second[0]["run_dir"]).parent == Path("sweeps/two")
