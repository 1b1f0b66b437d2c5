"""Data faults: unreadable images (fail fast or skip and count; decompression bombs too), an empty class
folder, directory links that repeat a class's images, labels out of range, CIFAR-100 files that would run
code when unpickled, splits that leave a class out, an out-of-range split seed."""
from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_line_error
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
    """Distil on an ImageFolder without JDA (these tests are about the files; views of ImageFolder
    images are made in the loader workers, tested in tests/test_data.py)."""
    return [*set_args(MICRO), "--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set", "data.batch_size=4",
            "--set", "data.train_fraction=1", "--set", "train.epochs=2", "--set", "augment.jda.policy=null", *extra]


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


def png_bomb(path: Path, side: int = 30_000) -> Path:
    """A 200-byte PNG that declares side x side RGB pixels (900 M for 30,000: over Pillow's
    2 x MAX_IMAGE_PIXELS, so opening it raises DecompressionBombError, which is not an OSError)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_fails_naming_the_file_or_is_skipped(tmp_path, cli_runner, fault_trials):
    trials = fault_trials("data")
    root = image_folder(tmp_path / "images", bad=False)
    bomb = png_bomb(root / "train" / "a" / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)  # the file is a bomb to Pillow
    with trials.trial():
        line = one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root), "--out", tmp_path / "fail"))
        assert "unreadable image" in line and str(bomb) in line and "data.bad_images" in line, line
    with trials.trial():
        result = cli_runner("distill", QUICKSTART, *folder_args(root, "--set", "data.bad_images=skip"),
                            "--out", tmp_path / "skip")
        assert result.exit_code == 0, result.output
        assert "skipped 1 unreadable training image(s)" in result.output, result.output


@pytest.mark.parametrize("link", ["loop", "parent", "twice"])
def test_directory_links_that_repeat_images_are_refused(link, tmp_path, cli_runner, fault_trials):
    """A link inside a class folder back to it (or above it), or two links to one folder, would count
    the same images again and again (torchvision follows links: 16 files became 656 samples)."""
    root = image_folder(tmp_path / "images", bad=False)
    cls = root / "train" / "a"
    if link == "loop":
        (cls / "again").symlink_to(cls, target_is_directory=True)
    elif link == "parent":
        (cls / "up").symlink_to(root / "train", target_is_directory=True)
    else:
        shared = tmp_path / "shared"
        image_folder(shared, bad=False)
        (cls / "x").symlink_to(shared / "train" / "b", target_is_directory=True)
        (cls / "y").symlink_to(shared / "train" / "b", target_is_directory=True)
    with fault_trials("data").trial():
        line = one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root), "--out", tmp_path / "run"))
        assert "data.root" in line and str(cls) in line and "counted more than once" in line, line
        assert not (tmp_path / "run").exists()


def test_a_directory_link_that_repeats_nothing_is_followed(tmp_path):
    from kdtool.data import build_datasets
    from kdtool.recipe import DataConfig

    root = image_folder(tmp_path / "images", bad=False)
    extra = image_folder(tmp_path / "extra", bad=False)
    (root / "train" / "a" / "more").symlink_to(extra / "train" / "a", target_is_directory=True)
    assert len(build_datasets(DataConfig(name="imagefolder", root=str(root), image_size=8)).train) == 24


class Payload:
    """Unpickling this calls Path.touch(marker): a reader that runs code from the file leaves the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("file", ["train", "test", "meta"])
def test_cifar100_pickle_that_runs_code_is_refused(file, tmp_path, cli_runner, fault_trials):
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()  # the payload does run when unpickled as torchvision unpickles
    marker.unlink()
    write_cifar100(tmp_path / "cifar")
    planted = tmp_path / "cifar" / "cifar-100-python" / file
    planted.write_bytes(pickle.dumps({"data": Payload(marker), "fine_labels": [0]}, protocol=2))
    with fault_trials("data").trial():
        line = one_line_error(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", "data.name=cifar100",
                                         "--set", f"data.root={tmp_path / 'cifar'}", "--out", tmp_path / "run"))
        assert not marker.exists(), "kdtool ran code from a CIFAR-100 file"
        assert str(planted) in line and "refused to load" in line, line


@pytest.mark.parametrize("labels, fraction", [
    ([0] * 10 + [1] * 10 + [2], 0.2),  # a class of one image cannot be on both sides
    ([0, 1, 2] * 4, 0.1),  # a validation side smaller than the number of classes
    ([0, 1, 2] * 4, 0.9),  # a training side smaller than the number of classes
])
def test_split_that_leaves_a_class_out_names_val_fraction(labels, fraction, fault_trials):
    from kdtool.data import stratified_split
    from kdtool.errors import KdtoolError

    with fault_trials("data").trial():
        with pytest.raises(KdtoolError, match=f"^data.val_fraction: {fraction} ") as failure:
            stratified_split(np.array(labels), fraction, 0)
        assert "\n" not in str(failure.value)


def test_negative_split_seed_is_one_line(cli_runner, fault_trials):
    from kdtool.data import stratified_split, stratified_subset
    from kdtool.errors import KdtoolError

    with fault_trials("data").trial():
        line = one_line_error(cli_runner("recipe", "check", QUICKSTART, "--set", "data.split_seed=-1"))
        assert "data.split_seed" in line, line
        for split in (lambda: stratified_split(np.array([0, 1] * 10), 0.2, -1),
                      lambda: stratified_subset([0, 1] * 10, 0.5, -1)):
            with pytest.raises(KdtoolError, match="^data.split_seed: -1 is out of range"):
                split()


@pytest.mark.parametrize("where", ["loader", "accelerator"])
def test_image_over_the_pixel_cap_fails_naming_the_file_or_is_skipped(where, tmp_path, cli_runner, fault_trials):
    """An image larger than kdtool's per-image cap (under Pillow's bomb limit) never reaches a canvas:
    it is an unreadable image, refused from its header before decoding, on either view path."""
    from kdtool.data import MAX_IMAGE_PIXELS

    trials = fault_trials("data")
    root = image_folder(tmp_path / "images", bad=False)
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 16
    large = png_bomb(root / "train" / "a" / "large.png", side)
    assert side * side < Image.MAX_IMAGE_PIXELS  # not a bomb to Pillow
    jda = ["--set", "augment.jda.policy=imagenet", "--set", f"augment.jda.device={where}"]
    with trials.trial():
        line = one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root, *jda), "--out", tmp_path / "fail"))
        assert "unreadable image" in line and str(large) in line and str(MAX_IMAGE_PIXELS) in line, line
    with trials.trial():
        result = cli_runner("distill", QUICKSTART, *folder_args(root, "--set", "data.bad_images=skip", *jda),
                            "--out", tmp_path / "skip")
        assert result.exit_code == 0, result.output
        assert "skipped 1 unreadable training image(s)" in result.output, result.output


def hostile_jpegs(folder: Path) -> dict[str, Path]:
    """JPEGs that `data.decode: accelerator` must not trust: one whose header and end marker are sound
    but that holds no scan (every decoder fails), one cut short, one whose header declares more than
    kdtool's pixel cap, and a JPEG start followed by junk."""
    from kdtool.data import MAX_IMAGE_PIXELS

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    good = buffer.getvalue()
    sof = good.index(b"\xff\xc0")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 16  # under Pillow's bomb limit, over kdtool's cap
    files = {"noscan": good[:good.index(b"\xff\xda")] + b"\xff\xd9", "cut": good[: len(good) // 2],
             "oversize": good[:sof + 5] + struct.pack(">HH", side, side) + good[sof + 9:],
             "junk": b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"}
    paths = {name: folder / f"hostile_{name}.jpg" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    return paths


GPU_DECODE = ["--set", "augment.jda.device=accelerator", "--set", "teacher.augment.jda.device=accelerator",
              "--set", "data.decode=accelerator"]


@pytest.mark.parametrize("kind", ["noscan", "cut", "oversize", "junk"])
def test_hostile_jpegs_decoded_on_the_accelerator_fail_naming_the_file(kind, tmp_path, cli_runner, fault_trials):
    """data.decode: accelerator (libjpeg-turbo on this CPU stands in for nvJPEG): a file that passes
    the worker's header check but no decoder reads, or that the header check refuses, fails in one
    line naming it, as the CPU path does; CMYK and progressive JPEGs beside it decode on the CPU."""
    root = image_folder(tmp_path / "images", bad=False)
    for mode, extra in (("CMYK", {}), ("RGB", {"progressive": True})):
        Image.open(root / "train" / "a" / "0.png").convert(mode).save(root / "train" / "a" / f"ok_{mode}.jpg", **extra)
    bad = hostile_jpegs(root / "train" / "b")
    for name, path in bad.items():
        if name != kind:
            path.unlink()
    with fault_trials("data").trial():
        line = one_line_error(cli_runner("distill", QUICKSTART, *folder_args(root, *GPU_DECODE), "--out", tmp_path / "run"))
        assert "unreadable image" in line and str(bad[kind]) in line and "data.bad_images" in line, line


def test_hostile_jpegs_decoded_on_the_accelerator_are_skipped_and_counted(tmp_path, cli_runner, fault_trials):
    root = image_folder(tmp_path / "images", bad=False)
    hostile_jpegs(root / "train" / "b")
    run_dir = tmp_path / "run"
    with fault_trials("data").trial():
        result = cli_runner("distill", QUICKSTART, *folder_args(root, "--set", "data.bad_images=skip", *GPU_DECODE),
                            "--out", run_dir)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["skipped_images"] for r in records] == [4] * len(records), records


@pytest.mark.parametrize("where", [["--set", "data.name=digits"], ["--set", "data.name=imagefolder", "--set",
                                   "data.root=.", "--set", "augment.jda.device=loader"]])
def test_accelerator_decoding_where_it_has_no_effect_is_refused(where, cli_runner, fault_trials):
    with fault_trials("data").trial():
        line = one_line_error(cli_runner("recipe", "check", QUICKSTART, *where, "--set", "data.decode=accelerator"))
        assert "decode: accelerator has no effect" in line, line
