"""Data faults: unreadable images (fail fast or skip and count), an empty class folder, labels out of range."""
from __future__ import annotations

import json
import pickle

import numpy as np
from PIL import Image

from conftest import one_line_error
from figures import FAULTS
from runs import MICRO, QUICKSTART, set_args
from test_data import write_cifar100


def image_folder(root, bad=True):
    """train/ and val/ with classes a and b of 8x8 PNGs; with `bad`, a truncated PNG and an empty JPEG in train/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if bad:
        good = (root / "train" / "a" / "0.png").read_bytes()
        (root / "train" / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
        (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    return root


def folder_args(root, *extra):
    return [*set_args(MICRO), "--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set", "data.batch_size=4",
            "--set", "data.train_fraction=1", "--set", "train.epochs=2", *extra]


def test_unreadable_images_fail_fast_naming_the_file(tmp_path, cli_runner):
    root = image_folder(tmp_path / "images")
    line = one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root), "--out", tmp_path / "run"))
    assert "unreadable image" in line and ("truncated.png" in line or "empty.jpg" in line) and "data.bad_images" in line, line


def test_unreadable_images_skipped_and_counted(tmp_path, cli_runner):
    root = image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    result = cli_runner("distill", QUICKSTART, *folder_args(root, "--set", "data.bad_images=skip"), "--out", run_dir)
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable training image(s)" in result.output
    for out in (run_dir / "teacher", run_dir):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["skipped_images"], r["skipped_val_images"]) for r in records] == [(2, 0)] * len(records)


def test_empty_class_folder_is_named(tmp_path, cli_runner):
    root = image_folder(tmp_path / "images", bad=False)
    (root / "train" / "c").mkdir()
    (root / "val" / "c").mkdir()
    line = one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root), "--out", tmp_path / "run"))
    assert f"class folder {root / 'train' / 'c'} holds no images" in line, line


def test_label_out_of_range_is_caught_before_training(tmp_path, cli_runner):
    write_cifar100(tmp_path)
    train_file = tmp_path / "cifar-100-python" / "train"
    batch = pickle.loads(train_file.read_bytes(), encoding="latin1")
    batch["fine_labels"][3] = 130
    train_file.write_bytes(pickle.dumps(batch, protocol=2))
    line = one_line_error(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", "data.name=cifar100",
                                     "--set", f"data.root={tmp_path}", "--out", tmp_path / "run"))
    assert str(train_file) in line and "label 130" in line and "100 classes" in line, line
    assert not (tmp_path / "run").exists()  # found before the run directory was touched
    assert FAULTS["data"].trials == 4
