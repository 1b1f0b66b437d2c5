"""Recipe loading, overrides, interpolation and every bad input the CLI must reject cleanly."""
from __future__ import annotations

import pytest
import yaml

from conftest import QUICKSTART, REPO, one_line_error
from kdtool.recipe import METHOD_SETTINGS, RecipeError, dump_recipe, load_recipe, parse_override, recipe_from_dict

SHIPPED = sorted(path.stem for path in (REPO / "recipes").glob("*.yaml"))


def test_quickstart_resolves_with_defaults():
    recipe = load_recipe(QUICKSTART)
    assert recipe.teacher.name == "resnet14" and recipe.student.name == "resnet8"
    assert recipe.method.name == "ccd" and recipe.augment.jda.policy == "digits"
    assert recipe.export.opset >= 17  # a default filled in


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate(name, monkeypatch):
    monkeypatch.setenv("CIFAR100_ROOT", "/data/cifar100")
    monkeypatch.setenv("IMAGENET_ROOT", "/data/imagenet")
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.name == name
    assert recipe.data.name == "digits" or recipe.data.root.startswith("/data/")


def test_shipped_recipes_include_the_papers_settings():
    assert {"quickstart", "cifar100_resnet32x4_resnet8x4", "imagenet_r50_mbv2", "imagenet_r34_r18"} <= set(SHIPPED)


def test_imagenet_r34_r18_is_the_papers_imagenet_setting(monkeypatch):
    """ResNet-34 (V1) -> ResNet-18, SGD 0.9 no Nesterov, lr 0.1, wd 1e-4, 768 originals a step, 200 epochs,
    x0.1 at 60/120/180, no warm-up, clip 20, mixed precision, CCD on the imagenet JDA policy."""
    monkeypatch.setenv("IMAGENET_ROOT", "/data/imagenet")
    recipe = load_recipe(REPO / "recipes" / "imagenet_r34_r18.yaml")
    assert (recipe.teacher.name, recipe.teacher.weights, recipe.student.name) == ("resnet34", "IMAGENET1K_V1", "resnet18")
    optimizer, schedule = recipe.train.optimizer, recipe.train.schedule
    assert (optimizer.name, optimizer.lr, optimizer.momentum, optimizer.nesterov, optimizer.weight_decay) == (
        "sgd", 0.1, 0.9, False, 1e-4)
    assert recipe.data.batch_size * recipe.train.grad_accum == 768
    assert recipe.data.batch_size % 8 == 0 and recipe.data.batch_size // 8 <= 64  # per GPU on 8 GPUs
    assert (recipe.augment.jda.views, recipe.augment.jda.policy, recipe.method.name) == (1, "imagenet", "ccd")
    assert recipe.train.epochs == 200 and schedule.name == "multistep" and schedule.milestones == [60, 120, 180]
    assert schedule.gamma == 0.1 and schedule.warmup_epochs == 0
    assert recipe.train.clip_grad_norm == 20 and recipe.runtime.mixed_precision != "no"


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_every_method_name_validates_over_the_quickstart(method, cli_runner):
    """The quickstart names only its method, so each method comes with its own defaults (DKD's 20 warm-up
    epochs, its CIFAR-100 default, are more than the quickstart's 12: refused until set)."""
    own = {"warmup_epochs": 1} if method == "dkd" else {}
    overrides = [f"method.name={method}"] + [f"method.{key}={value}" for key, value in own.items()]
    recipe = load_recipe(QUICKSTART, overrides)
    assert recipe.method == METHOD_SETTINGS[method](**own)
    assert cli_runner("recipe", "check", QUICKSTART, *[a for o in overrides for a in ("--set", o)]).exit_code == 0


def test_method_settings_live_with_the_method():
    recipe = load_recipe(QUICKSTART, ["method.name=dkd", "method.nckd_weight=2", "method.warmup_epochs=5"])
    assert (recipe.method.tckd_weight, recipe.method.nckd_weight, recipe.method.warmup_epochs) == (1.0, 2.0, 5.0)
    assert recipe.method.warmup_ramp == "per_epoch"  # the authors' schedule by default
    recipe = load_recipe(QUICKSTART, ["method.name=dist", "method.intra_weight=3"])
    assert (recipe.method.inter_weight, recipe.method.intra_weight) == (1.0, 3.0)
    assert load_recipe(QUICKSTART, ["method={temperature: 2}"]).method.name == "ccd"  # name defaults to ccd
    resolved = load_recipe(QUICKSTART, ["method.name=dist"])
    assert recipe_from_dict(yaml.safe_load(dump_recipe(resolved))) == resolved


def test_the_methods_table_fills_the_chosen_method_and_the_method_section_wins():
    table = ["methods.dkd={temperature: 1, nckd_weight: 0.5, warmup_epochs: 1}", "methods.dist={temperature: 1}"]
    recipe = load_recipe(QUICKSTART, [*table, "method.name=dkd"])
    assert (recipe.method.temperature, recipe.method.nckd_weight, recipe.method.tckd_weight) == (1.0, 0.5, 1.0)
    assert load_recipe(QUICKSTART, [*table, "method.name=dkd", "method.temperature=3"]).method.temperature == 3.0
    assert load_recipe(QUICKSTART, [*table, "method.name=kd"]).method.temperature == 4.0  # kd has no entry
    resolved = load_recipe(QUICKSTART, [*table, "method.name=dist"])
    again = recipe_from_dict(yaml.safe_load(dump_recipe(resolved)))
    assert again == resolved and set(yaml.safe_load(dump_recipe(resolved))["methods"]) == {"dkd", "dist"}


AUTHORS = {  # recipe -> method -> (temperature, CE weight, term weight, own settings); sources in the recipes
    "cifar100_resnet32x4_resnet8x4": {
        "dkd": (4, 1, 1, {"tckd_weight": 1, "nckd_weight": 8, "warmup_epochs": 20, "warmup_ramp": "per_epoch"}),
        "dist": (4, 1, 2, {"inter_weight": 1, "intra_weight": 1}),  # dist_cifar.yaml: dist_t4, 1 + 2
        "ccd": (4, 1, 1, {}), "kd": (4, 1, 1, {})},
    "imagenet_r34_r18": {
        "dkd": (1, 1, 1, {"tckd_weight": 1, "nckd_weight": 0.5, "warmup_epochs": 1, "warmup_ramp": "per_epoch"}),
        "dist": (1, 1, 2, {"inter_weight": 1, "intra_weight": 1}),  # resnet_dist.yaml: dist (tau 1), 1 + 2
        "ccd": (4, 1, 1, {}), "kd": (4, 1, 1, {})},
    "imagenet_r50_mbv2": {
        "dkd": (1, 1, 1, {"tckd_weight": 1, "nckd_weight": 2, "warmup_epochs": 1, "warmup_ramp": "per_epoch"}),
        "dist": (1, 1, 2, {"inter_weight": 1, "intra_weight": 1}),
        "ccd": (4, 1, 1, {}), "kd": (4, 1, 1, {})},
}


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_shipped_recipes_carry_the_authors_method_settings(name, monkeypatch):
    monkeypatch.setenv("CIFAR100_ROOT", "/data/cifar100")
    monkeypatch.setenv("IMAGENET_ROOT", "/data/imagenet")
    path = REPO / "recipes" / f"{name}.yaml"
    assert load_recipe(path).method.name == "ccd"
    for method, (temperature, ce, term, own) in AUTHORS[name].items():
        settings = load_recipe(path, [f"method.name={method}"]).method
        assert settings.temperature == temperature
        assert settings.kd_weight * settings.alpha == pytest.approx(ce)
        assert settings.kd_weight * (1 - settings.alpha) == pytest.approx(term)
        assert {key: getattr(settings, key) for key in own} == own
    assert load_recipe(path).train.label_smoothing == 0  # none of the authors' settings smooths labels


@pytest.mark.parametrize("overrides, message", [
    (["method.name=vanilla", "method.temperature=2"], "method.temperature has no effect for method.name vanilla"),
    (["method.name=kd", "method.tckd_weight=2"], "method.tckd_weight has no effect for method.name kd"),
    (["method.alpha=0", "train.label_smoothing=0.1"], "train.label_smoothing has no effect with method.alpha 0"),
    (["method.name=dkd", "method.warmup_epochs=0", "method.warmup_ramp=per_step"],
     "warmup_ramp per_step has no effect with warmup_epochs 0"),
    (["method.alpha=1"], "method.alpha: input should be less than 1"),
    (["method.kd_weight=0"], "method.kd_weight: input should be greater than 0"),
    (["methods.dkk={temperature: 1}"], "unknown key methods.dkk (did you mean 'dkd'?)"),
    (["methods.dkd.nckd_wieght=1"], "unknown key methods.dkd.nckd_wieght (did you mean 'nckd_weight'?)"),
])
def test_a_setting_without_effect_is_refused_in_one_line(overrides, message, cli_runner):
    args = [arg for override in overrides for arg in ("--set", override)]
    assert message in one_line_error(cli_runner("recipe", "check", QUICKSTART, *args))


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
    "yaml syntax": ("name: x\nteacher: {name: resnet8\n", r"YAML error at line \d+"),
    "unknown key": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ntrain: {epoch: 3}\n",
                    r"unknown key train.epoch \(did you mean 'epochs'\?\)"),
    "wrong type": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ntrain: {epochs: many}\n",
                   r"train.epochs: .*integer.*'many'"),
    "out of range": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\nmethod: {alpha: 1.5}\n",
                     r"method.alpha: .*less than 1"),
    "missing key": ("name: x\nteacher: {name: resnet8}\n", r"student: required key is missing"),
    "not a mapping": ("- a\n- b\n", r"must be a mapping"),
    "bad milestone": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n"
                      "train: {epochs: 5, schedule: {name: multistep, milestones: [9]}}\n", r"train\.schedule\.milestones: must lie in 1\.\.5"),
    "billion laughs": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\na: &a [x, x, x, x, x, x, x, x, x]\n"
                       + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
                       r"more than \d+ values once aliases are expanded"),
    "recursive alias": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\nx: &a [*a]\n",
                        r"line 4: alias \*a is used inside the value it names"),
    "recursive mapping alias": ("name: x\nteacher: &t {name: resnet8, train: *t}\nstudent: {name: resnet8}\n",
                                r"alias \*t is used inside the value it names"),
    "deep nesting": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ntrain: " + "{a: " * 5000 + "1"
                     + "}" * 5000 + "\n", r"nested deeper than \d+ levels"),
    "deep block nesting": ("name: x\ntrain:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200)), r"nested deeper"),
    "deep through aliases": ("name: x\na: &a " + "[" * 20 + "]" * 20 + "\nb: &b " + "[" * 15 + "*a" + "]" * 15 + "\n",
                             r"nested deeper than \d+ levels once aliases are expanded"),
    "nan gate": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\nbench: {gate: {max_top1_drop: {int8: .nan}}}\n",
                 r"bench.gate.max_top1_drop.int8: input should be a finite number"),
    "inf lr": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ntrain: {optimizer: {lr: .inf}}\n",
               r"train.optimizer.lr: input should be a finite number"),
    "unknown gate precision": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n"
                               "bench: {gate: {max_top1_drop: {int9: 1}}}\n", r"unknown key bench.gate.max_top1_drop.int9 \(did you mean 'int8'\?\); known: fp32, fp16, int8"),
    "negative seed": ("name: x\nseed: -1\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n", r"seed: .*greater than or equal to 0"),
    "huge seed": ("name: x\nseed: 100000000000000000000000\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                  r"seed: .*less than or equal to 4294967295"),
    "negative split seed": ("name: x\ndata: {split_seed: -2}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                            r"data.split_seed: .*greater than or equal to 0"),
    "val fraction": ("name: x\ndata: {val_fraction: 0.0001}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                     r"data.val_fraction: .*0.01"),
    "empty verify batches": ("name: x\nexport: {verify_batch_sizes: []}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                             r"export.verify_batch_sizes: .*at least 1 item"),
    "zero verify batch": ("name: x\nexport: {verify_batch_sizes: [0]}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                          r"export.verify_batch_sizes.0: .*greater than or equal to 1"),
    "opset": ("name: x\nexport: {opset: 42}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
              r"export.opset: opset 42 is not supported: use 17..20"),
    "escaping bundle name": ("name: x\nexport: {name: ../..}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                             r"export.name: must be a plain name"),
    "absolute bundle name": ("name: x\nexport: {name: /etc}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                             r"export.name: must be a plain name"),
    "escaping export root": ("name: x\nexport: {root: a/../../b}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                             r"export.root: .*'\.\.'"),
    "empty bench batches": ("name: x\nbench: {batch_sizes: []}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                            r"bench.batch_sizes: .*at least 1 item"),
    "unknown method": ("name: x\nmethod: {name: dkdd}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                       r"method.name: unknown method 'dkdd' \(did you mean 'dkd'\?\); known: ccd, dist, dkd, kd, vanilla"),
    "method setting typo": ("name: x\nmethod: {name: dkd, nckd_wieght: 2}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n",
                            r"unknown key method.nckd_wieght \(did you mean 'nckd_weight'\?\)"),
    "another method's setting": ("name: x\nmethod: {name: kd, inter_weight: 2}\nteacher: {name: resnet8}\n"
                                 "student: {name: resnet8}\n", r"method.inter_weight has no effect for method.name kd \(a setting of method dist\)"),
    "repeated key": ("name: x\nteacher: {name: resnet8}\nstudent: {name: resnet8}\ntrain: {epochs: 3}\n"
                     "train: {epochs: 30}\n", r"YAML error at line 5, column 1: key 'train' given twice"),
    "repeated nested key": ("name: x\nteacher: {name: resnet8, name: resnet14}\nstudent: {name: resnet8}\n",
                            r"line 2, column 26: key 'name' given twice"),
    "method setting range": ("name: x\nmethod: {name: dkd, warmup_epochs: -1}\nteacher: {name: resnet8}\n"
                             "student: {name: resnet8}\n", r"method.warmup_epochs: .*greater than or equal to 0"),
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


def test_merge_keys_may_be_overridden_by_the_mapping(tmp_path):
    """A YAML merge key (<<) is not a repeated key: the mapping's own keys override the merged ones."""
    path = tmp_path / "merge.yaml"
    path.write_text("name: x\nbase: &b {epochs: 3, eval_every: 2}\nteacher: {name: resnet8}\nstudent: {name: resnet8}\n"
                    "train: {<<: *b, epochs: 4}\n")
    with pytest.raises(RecipeError, match="unknown key base"):
        load_recipe(path)
    path.write_text(path.read_text().replace("base: &b {epochs: 3, eval_every: 2}\n", "")
                    .replace("train: {<<: *b, epochs: 4}", "train: &b {<<: {epochs: 3, eval_every: 2}, epochs: 4}"))
    assert (load_recipe(path).train.epochs, load_recipe(path).train.eval_every) == (4, 2)


def test_missing_recipe_file(cli_runner):
    assert "recipe not found: nope.yaml" in one_line_error(cli_runner("distill", "nope.yaml"))


def test_binary_recipe_file(cli_runner, tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81garbage")
    one_line_error(cli_runner("recipe", "check", tmp_path / "bin.yaml"))


def test_bad_override(cli_runner):
    assert "expected key.path=value" in one_line_error(cli_runner("recipe", "check", QUICKSTART, "--set", "train.epochs"))
    assert "unknown key train.epoks" in one_line_error(cli_runner("recipe", "check", QUICKSTART, "--set", "train.epoks=2"))


@pytest.mark.parametrize("override, pattern", [
    ("bench.gate.max_top1_drop.int8=.nan", r"bench.gate.max_top1_drop.int8: input should be a finite number"),
    ("x=&a [*a]", r"--set 'x=&a \[\*a\]': line 1: alias \*a is used inside the value it names"),
    ("train=" + "[" * 100 + "]" * 100, r"nested deeper than"),
    ("a" + ".a" * 100 + "=1", r"key path deeper than"),
    ("seed=-1", r"seed: .*greater than or equal to 0"),
    ("export.name=..", r"export.name: must be a plain name"),
    ("export.opset=21", r"export.opset: opset 21 is not supported: use 17..20"),
    ("runtime.threads=100000", r"runtime.threads: input should be less than or equal to 1024"),
    ("export.reference_images=0", r"export.reference_images: input should be greater than or equal to 1"),
])
def test_hostile_override_is_one_line(override, pattern, cli_runner):
    import re
    line = one_line_error(cli_runner("recipe", "check", QUICKSTART, "--set", override))
    assert re.search(pattern, line), line


@pytest.mark.parametrize("seed, message", [("-1", "seed: input should be greater than or equal to 0"),
                                           (str(2**32), "seed: input should be less than or equal to 4294967295"),
                                           ("1e23", "'1e23' is not a valid integer")])
def test_seed_option_out_of_range_is_one_line(seed, message, cli_runner, tmp_path):
    assert message in one_line_error(cli_runner("distill", QUICKSTART, "--seed", seed))
    assert not (tmp_path / "runs").exists()


def test_oversized_recipe_file_names_the_file(cli_runner, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n# " + "x" * (2 << 20) + "\n")
    assert "big.yaml" in one_line_error(cli_runner("recipe", "check", path))


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


def test_the_schema_knows_every_jda_policy_and_no_other():
    """recipe.JDA_POLICIES (checked when a recipe is read) and augment.POLICIES (what builds the views) agree."""
    from kdtool.augment import POLICIES
    from kdtool.recipe import JDA_POLICIES

    assert set(JDA_POLICIES) == set(POLICIES)
