"""Recipe loading, overrides, interpolation and every bad input the CLI must reject cleanly."""
from __future__ import annotations

import pytest

from conftest import QUICKSTART, REPO, one_line_error
from kdtool.recipe import RecipeError, load_recipe, parse_override, recipe_from_dict


def test_quickstart_resolves_with_defaults():
    recipe = load_recipe(QUICKSTART)
    assert recipe.teacher.name == "resnet14" and recipe.student.name == "resnet8"
    assert recipe.method.name == "ccd" and recipe.augment.jda.policy == "digits"
    assert recipe.export.opset >= 17  # a default filled in


@pytest.mark.parametrize("name", ["cifar100_resnet32x4_resnet8x4", "imagenet_r50_mbv2"])
def test_shipped_recipes_validate(name, monkeypatch):
    monkeypatch.setenv("CIFAR100_ROOT", "/data/cifar100")
    monkeypatch.setenv("IMAGENET_ROOT", "/data/imagenet")
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.data.root.startswith("/data/")


def test_overrides_are_typed_and_win():
    recipe = load_recipe(QUICKSTART, ["train.epochs=3", "method.name=kd", "train.clip_grad_norm=2.5", "teacher.weights=null"])
    assert recipe.train.epochs == 3 and recipe.method.name == "kd" and recipe.train.clip_grad_norm == 2.5
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_env_interpolation(monkeypatch, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ndata: {name: cifar100, root: \"${MY_ROOT}/c\"}\n")
    monkeypatch.setenv("MY_ROOT", "/mnt")
    assert load_recipe(path).data.root == "/mnt/c"
    monkeypatch.delenv("MY_ROOT")
    with pytest.raises(RecipeError, match=r"data.root: environment variable \$\{MY_ROOT\} is not set"):
        load_recipe(path)


def test_digest_changes_with_content():
    assert load_recipe(QUICKSTART).digest() == load_recipe(QUICKSTART).digest()
    assert load_recipe(QUICKSTART).digest() != load_recipe(QUICKSTART, ["seed=1"]).digest()


BAD_RECIPES = {
    "yaml syntax": ("name: x\nteacher: {name: resnet8\n", r"YAML syntax error at line \d+"),
    "unknown key": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ntrain: {epoch: 3}\n",
                    r"unknown key train.epoch \(did you mean 'epochs'\?\)"),
    "wrong type": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ntrain: {epochs: many}\n",
                   r"train.epochs: .*integer.*'many'"),
    "out of range": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\nmethod: {alpha: 1.5}\n",
                     r"method.alpha: .*less than or equal to 1"),
    "missing key": ("name: x\nteacher: {name: resnet8}\n", r"student: required key is missing"),
    "not a mapping": ("- a\n- b\n", r"must be a mapping"),
    "bad milestone": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n"
                      "train: {epochs: 5, schedule: {name: multistep, milestones: [9]}}\n", r"train: .*milestones"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_one_line_exit_2(case, cli_runner, tmp_path):
    text, pattern = BAD_RECIPES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = one_line_error(cli_runner("recipe", "check", path))
    assert "bad.yaml" in line
    import re
    assert re.search(pattern, line), line


def test_missing_recipe_file(cli_runner):
    assert "recipe not found: nope.yaml" in one_line_error(cli_runner("distill", "nope.yaml"))


def test_binary_recipe_file(cli_runner, tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81garbage")
    one_line_error(cli_runner("recipe", "check", tmp_path / "bin.yaml"))


def test_bad_override(cli_runner):
    assert "expected key.path=value" in one_line_error(cli_runner("recipe", "check", QUICKSTART, "--set", "train.epochs"))
    assert "unknown key train.epoks" in one_line_error(cli_runner("recipe", "check", QUICKSTART, "--set", "train.epoks=2"))


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from kdtool.cli import cli

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--debug", "recipe", "check", "nope.yaml"])
    assert isinstance(result.exception, RecipeError)


def test_recipe_check_prints_resolved(cli_runner):
    result = cli_runner("recipe", "check", QUICKSTART, "--set", "train.epochs=7")
    assert result.exit_code == 0
    assert load_recipe(QUICKSTART, ["train.epochs=7"]).model_dump() == recipe_from_dict(
        __import__("yaml").safe_load(result.output)).model_dump()
