"""Hostile bundles and hostile export targets (issue 9): kdtool replaces only a bundle it made, never follows
a bundle's symlinks out, locks a bundle against a racing export or bench, cleans only its own leftovers,
and refuses every artefact that does not fit its manifest with one line (exit 2), or fails (exit 1) an
artefact that cannot run, never printing 'gate passed' over it.

Families (tests/reliability/figures.py): bundle_ownership, bundle_lock, bundle_bench; each `with
trials.trial()` block is one counted trial.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error
from kdtool.bundle import bundle_lock, find_latest_bundle, lock_file, read_manifest
from kdtool.export import export_bundle, export_onnx
from kdtool.io import sha256_file
from kdtool.recipe import load_recipe
from kdtool.train import distill
from runs import MICRO, QUICKSTART, REPO, reference, set_args  # noqa: F401

FP32_ONLY = ["export.int8.enabled=false", "export.fp16=false"]
FAST_BENCH = ["--iters", "1", "--batch", "1", "--no-progress"]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    """A micro run whose teacher learned (the whole digits training set for an epoch): bench refuses to pass a
    gate over a teacher at chance, which the micro run's teacher is."""
    run_dir = tmp_path_factory.mktemp("learned") / "run"
    distill(load_recipe(QUICKSTART, [*MICRO, "data.train_fraction=1.0", "train.epochs=1"]), run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def good_bundle(learned_run, tmp_path_factory) -> Path:
    return export_bundle(learned_run, out=tmp_path_factory.mktemp("bundles") / "good", overrides=FP32_ONLY,
                         progress=False)


def copy_of(bundle: Path, where: Path) -> Path:
    return Path(shutil.copytree(bundle, where, symlinks=True))


def edit_manifest(bundle: Path, edit) -> None:
    """Apply `edit` to manifest.json as plain JSON (the manifest may no longer fit the schema)."""
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


def rehash(bundle: Path, key: str) -> None:
    """Make the manifest agree with the artefact's bytes, as a faulty export would have written it."""
    def update(data):
        path = bundle / data["artefacts"][key]["file"]
        data["artefacts"][key].update(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    edit_manifest(bundle, update)


def user_files(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ ownership
def test_export_replaces_only_a_kdtool_bundle(reference, good_bundle, tmp_path, cli_runner, monkeypatch, fault_trials):
    trials = fault_trials("bundle_ownership")
    run = reference[0]
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    user_dir = tmp_path / "work"
    (user_dir / "src").mkdir(parents=True)
    (user_dir / "src" / "main.py").write_text("print('mine')")
    foreign = tmp_path / "app"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my web app", "version": "1.0"}')
    link = tmp_path / "link"
    link.symlink_to(good_bundle)
    before = {d: user_files(d) for d in (home, user_dir, foreign, good_bundle)}
    targets = [(user_dir, user_dir), (user_dir.parent, user_dir), (home, tmp_path), (user_dir, tmp_path),
               (foreign, tmp_path), (link, tmp_path)]
    for target, cwd in targets:  # (what --out names, the working directory)
        with trials.trial():
            monkeypatch.chdir(cwd)
            line = one_line_error(cli_runner("export", run, "--out", target, "--overwrite", *set_args(FP32_ONLY)))
            assert "refusing to replace" in line, line
            assert {d: user_files(d) for d in before} == before
    for name in ("..", ".", "../escaped", "/tmp/abs", "a/b", "a\\b", ""):
        with trials.trial():
            monkeypatch.chdir(user_dir)
            result = cli_runner("export", run, "--overwrite", "--set", f"export.name={name}", *set_args(FP32_ONLY))
            assert "export.name" in one_line_error(result)
            assert {d: user_files(d) for d in before} == before and not (tmp_path / "escaped").exists()
    with trials.trial():
        result = cli_runner("export", run, "--set", "export.root=../outside", *set_args(FP32_ONLY))
        assert "export.root" in one_line_error(result) and not (tmp_path / "outside").exists()


# ------------------------------------------------------------------ the lock and leftovers
def _lock_is_held(path: Path) -> bool:
    if not path.exists():
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_bench_racing_export_overwrite_is_refused(learned_run, good_bundle, tmp_path, cli_runner, fault_trials):
    trials = fault_trials("bundle_lock")
    bundle = copy_of(good_bundle, tmp_path / "bundle")
    args = [sys.executable, "-m", "kdtool.cli", "export", str(learned_run), "--out", str(bundle), "--overwrite",
            "--no-progress", *set_args(FP32_ONLY)]
    with trials.trial():
        process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not _lock_is_held(lock_file(bundle)) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert process.poll() is None, "the export ended before the race could be staged"
        line = one_line_error(cli_runner("bench", bundle, *FAST_BENCH))
        assert "in use by another kdtool process" in line, line
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert cli_runner("bench", bundle, *FAST_BENCH).exit_code == 0
        report = json.loads((bundle / "report.json").read_text())
        assert report["bundle"] == str(bundle) and read_manifest(bundle).artefacts["fp32"].sha256 == sha256_file(
            bundle / "model.fp32.onnx")
    with trials.trial():
        before = user_files(bundle)
        with bundle_lock(bundle):  # a bench in progress
            line = one_line_error(cli_runner("export", learned_run, "--out", bundle, "--overwrite", *set_args(FP32_ONLY)))
        assert "in use" in line and user_files(bundle) == before


def test_leftovers_are_never_bundles_and_only_kdtools_are_cleaned(reference, good_bundle, tmp_path, cli_runner,
                                                                 fault_trials):
    trials = fault_trials("bundle_lock")
    root = tmp_path / "export"
    bundle = copy_of(good_bundle, root / "b")
    ours = [copy_of(good_bundle, root / ".b.abcd1234.old"), root / ".b.efgh5678.partial", root / ".b.ijkl9012.partial"]
    ours[1].mkdir()
    (ours[1] / ".kdtool-bundle-staging").touch()
    (ours[1] / "model.fp32.onnx").write_bytes(b"half written")
    ours[2].mkdir()
    users = root / ".b.zzzz9999.partial"
    users.mkdir()
    (users / "keep.txt").write_text("not kdtool's")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not kdtool's")
    (root / ".b.yyyy8888.old").symlink_to(elsewhere)
    other_bundle_staging = root / ".b.c.abcd1234.partial"  # bundle "b.c"'s, in progress
    other_bundle_staging.mkdir()
    (other_bundle_staging / ".kdtool-bundle-staging").touch()
    for leftover in ours:
        os.utime(leftover, (time.time() + 100, time.time() + 100))
    with trials.trial():
        assert find_latest_bundle(root) == bundle
    with trials.trial():
        result = cli_runner("export", reference[0], "--out", bundle, "--overwrite", *set_args(FP32_ONLY))
        assert result.exit_code == 0, result.output
        assert not any(path.exists() for path in ours)
        assert (users / "keep.txt").exists() and (elsewhere / "keep.txt").exists()
        assert (root / ".b.yyyy8888.old").is_symlink() and other_bundle_staging.exists()


def test_a_killed_exports_leftovers_are_cleaned_by_the_next(learned_run, tmp_path, cli_runner, fault_trials):
    """SIGKILL an export while it writes: its .partial and its lock stay behind; the next export takes the
    lock (the kernel released it), removes the .partial, and writes a bundle that benches."""
    trials = fault_trials("bundle_lock")
    bundle = tmp_path / "export" / "b"
    args = [sys.executable, "-m", "kdtool.cli", "export", str(learned_run), "--out", str(bundle), "--no-progress",
            *set_args(FP32_ONLY)]
    with trials.trial():
        process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(bundle.parent.glob(".b.*.partial")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.kill()
        process.wait(timeout=60)
        assert list(bundle.parent.glob(".b.*.partial")) and lock_file(bundle).exists() and not bundle.exists()
        result = cli_runner("export", learned_run, "--out", bundle, *set_args(FP32_ONLY))
        assert result.exit_code == 0, result.output
        assert not list(bundle.parent.glob(".b.*.partial")) and not _lock_is_held(lock_file(bundle))
        assert cli_runner("bench", bundle, *FAST_BENCH).exit_code == 0


# ------------------------------------------------------------------ bench over hostile bundles
def _other_onnx(path: Path, image_size: int, classes: int) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, classes))
    export_onnx(net.eval(), path, image_size=image_size, opset=17)


def _escape(data, value):
    data["artefacts"]["fp32"]["file"] = value


def _symlink_out(bundle: Path, tmp: Path) -> None:
    outside = tmp / "outside.onnx"
    shutil.copy(bundle / "model.fp32.onnx", outside)
    (bundle / "model.fp32.onnx").unlink()
    (bundle / "model.fp32.onnx").symlink_to(outside)  # same bytes, same hash: still not the bundle's own file


def _reference_dir_out(bundle: Path, tmp: Path) -> None:
    shutil.move(bundle / "reference", tmp / "reference")
    (bundle / "reference").symlink_to(tmp / "reference")


def _pickled_labels(bundle: Path, tmp: Path) -> None:
    path = bundle / "reference" / "labels.npy"
    np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)

    def update(data):
        data["reference"]["labels"].update(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    edit_manifest(bundle, update)


def _labels_out_of_range(bundle: Path, tmp: Path) -> None:
    path = bundle / "reference" / "labels.npy"
    labels = np.load(path)
    labels[0] = 99
    np.save(path, labels)

    def update(data):
        data["reference"]["labels"].update(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    edit_manifest(bundle, update)


def _replace_model(image_size_delta: int, classes_delta: int):
    def damage(bundle: Path, tmp: Path) -> None:
        size = read_manifest(bundle).preprocessing.image_size
        _other_onnx(bundle / "model.fp32.onnx", size + image_size_delta, 10 + classes_delta)
        rehash(bundle, "fp32")
    return damage


EXIT_2_CASES = {  # damage -> a fragment of the one error line
    "path escaping the bundle": (lambda b, t: edit_manifest(b, lambda d: _escape(d, "../outside.onnx")), "artefacts.fp32.file"),
    "absolute path": (lambda b, t: edit_manifest(b, lambda d: _escape(d, "/etc/hostname.onnx")), "artefacts.fp32.file"),
    "artefact symlinked out": (_symlink_out, "symbolic link"),
    "reference folder symlinked out": (_reference_dir_out, "symbolic link"),
    "kind changed": (lambda b, t: edit_manifest(b, lambda d: d["artefacts"]["fp32"].update(kind="tensorrt")), "artefacts.fp32"),
    "target changed": (lambda b, t: edit_manifest(b, lambda d: d["artefacts"]["fp32"].update(target="tensorrt")), "artefacts.fp32"),
    "sha256 missing": (lambda b, t: edit_manifest(b, lambda d: d["artefacts"]["fp32"].pop("sha256")), "artefacts.fp32.sha256"),
    "size_bytes missing": (lambda b, t: edit_manifest(b, lambda d: d["artefacts"]["fp32"].pop("size_bytes")), "size_bytes"),
    "swapped ONNX, manifest untouched": (lambda b, t: _other_onnx(b / "model.fp32.onnx", 8, 10), "model.fp32.onnx"),
    "input shape differs": (_replace_model(4, 0), "input shape"),
    "class count differs": (_replace_model(0, 1), "output shape"),
    "file: 5": (lambda b, t: edit_manifest(b, lambda d: _escape(d, 5)), "artefacts.fp32.file"),
    "image_size: 'abc'": (lambda b, t: edit_manifest(b, lambda d: d["preprocessing"].update(image_size="abc")), "preprocessing.image_size"),
    "7-value mean": (lambda b, t: edit_manifest(b, lambda d: d["preprocessing"].update(mean=[0.5] * 7)), "preprocessing.mean"),
    "NaN std": (lambda b, t: (b / "manifest.json").write_text((b / "manifest.json").read_text().replace('"std": [', '"std": [NaN, ', 1)), "preprocessing.std"),
    "old format version": (lambda b, t: edit_manifest(b, lambda d: d["format"].update(version=2)), "written by kdtool"),
    "reference labels pickled": (_pickled_labels, "reference"),
    "reference labels out of range": (_labels_out_of_range, "labels outside"),
}


def test_bench_refuses_bundles_that_do_not_fit_their_manifest(good_bundle, tmp_path, cli_runner, fault_trials):
    trials = fault_trials("bundle_bench")
    for name, (damage, fragment) in EXIT_2_CASES.items():
        with trials.trial():
            scratch = tmp_path / name.replace(" ", "_").replace("'", "").replace(":", "")
            bundle = copy_of(good_bundle, scratch / "bundle")
            damage(bundle, scratch)
            result = cli_runner("bench", bundle, *FAST_BENCH)
            line = one_line_error(result)
            assert fragment in line, f"{name}: {line}"
            assert "gate passed" not in result.output


def test_bench_fails_an_artefact_that_cannot_run(good_bundle, tmp_path, cli_runner, fault_trials):
    with fault_trials("bundle_bench").trial():
        bundle = copy_of(good_bundle, tmp_path / "bundle")
        (bundle / "model.fp32.onnx").write_bytes(b"\x08\x07garbage that ONNX Runtime cannot load")
        rehash(bundle, "fp32")
        result = cli_runner("bench", bundle, *FAST_BENCH)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "could not run" in result.output and "gate passed" not in result.output
        report = json.loads((bundle / "report.json").read_text())
        assert report["gate"]["passed"] is False and report["failed"][0]["artefact"] == "fp32"


def test_data_for_an_embedded_dataset_is_refused(good_bundle, tmp_path, cli_runner, fault_trials):
    """The digits are embedded: a `--data DIR` would not be read, so it is refused (exit 2), DIR present or not."""
    trials = fault_trials("bench_data")
    (tmp_path / "digits").mkdir()
    for directory in (tmp_path / "digits", tmp_path / "missing"):
        with trials.trial():
            line = one_line_error(cli_runner("bench", good_bundle, "--data", directory, *FAST_BENCH))
            assert "takes no root" in line and str(directory) in line, line
