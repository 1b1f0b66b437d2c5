"""Dataset loaders on data in the real on-disk formats, written by the tests."""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from kdtool.data import build_datasets, build_loader, normalize, stratified_subset
from kdtool.errors import KdtoolError
from kdtool.recipe import DataConfig


def test_digits_split_is_stratified_seeded_and_uint8():
    data = build_datasets(DataConfig(name="digits"))
    image, label = data.val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    assert len(data.train) + len(data.val) == 1797
    counts = Counter(data.val.targets)
    assert max(counts.values()) - min(counts.values()) <= 2  # stratified: every digit ~36 times
    again = build_datasets(DataConfig(name="digits"))
    assert torch.equal(data.val.images, again.val.images)
    other = build_datasets(DataConfig(name="digits", split_seed=1))
    assert not torch.equal(data.val.images, other.val.images)


def test_few_shot_fraction_is_stratified():
    data = build_datasets(DataConfig(name="digits", train_fraction=0.1))
    labels = [data.train.dataset.targets[i] for i in data.train.indices]
    assert abs(len(labels) - 0.1 * 1437) <= 1
    assert set(Counter(labels).values()) <= {14, 15}
    assert stratified_subset([0, 1] * 50, 0.1, 0) == stratified_subset([0, 1] * 50, 0.1, 0)


def test_normalize_uses_mean_and_std():
    info = build_datasets(DataConfig(name="digits")).info
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(info.mean)) / torch.tensor(info.std)
    assert torch.allclose(normalize(images, info)[0, :, 0, 0], expected)


def write_cifar100(root, n_train=20, n_test=10, corrupt=False):
    """CIFAR-100 python files as the official archive lays them out (protocol-2 pickles of dicts).

    The archive's Python 2 pickles unpickle with str keys under encoding="latin1", as torchvision reads them.
    """
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": (np.arange(n) % 100).tolist(),
                 "coarse_labels": (np.arange(n) % 20).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        payload = pickle.dumps(batch, protocol=2)
        (base / name).write_bytes(payload[: len(payload) // 2] if corrupt else payload)
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i}" for i in range(100)],
                                              "coarse_label_names": [f"super{i}" for i in range(20)]}, protocol=2))
    return batch


def test_cifar100_reads_the_pickle_batches(tmp_path):
    test_batch = write_cifar100(tmp_path)
    data = build_datasets(DataConfig(name="cifar100", root=str(tmp_path)))
    assert len(data.train) == 20 and len(data.val) == 10 and data.info.num_classes == 100
    image, label = data.val[3]
    expected = torch.from_numpy(test_batch["data"][3].reshape(3, 32, 32))
    assert torch.equal(image, expected) and label == 3
    assert data.info.class_names[5] == "class5"
    train_image, _ = data.train[0]
    assert train_image.shape == (3, 32, 32) and train_image.dtype == torch.uint8


def test_cifar100_corrupt_or_missing(tmp_path):
    with pytest.raises(KdtoolError, match="dataset root not found"):
        build_datasets(DataConfig(name="cifar100", root=str(tmp_path / "nowhere")))
    write_cifar100(tmp_path / "bad", corrupt=True)
    with pytest.raises(KdtoolError, match="train is not a readable CIFAR-100 python file"):
        build_datasets(DataConfig(name="cifar100", root=str(tmp_path / "bad")))


def write_imagefolder(root, classes=("cat", "dog", "eel"), per_class=4, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_imagefolder_png_and_jpeg(tmp_path):
    write_imagefolder(tmp_path)
    data = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=24))
    assert data.info.class_names == ("cat", "dog", "eel") and len(data.train) == 12
    image, label = data.val[5]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and label == 1
    images, labels = next(iter(build_loader(data.train, DataConfig(name="imagefolder", batch_size=4), train=True)))
    assert images.shape == (4, 3, 24, 24)


def test_imagefolder_bad_files(tmp_path):
    with pytest.raises(KdtoolError, match="train not found"):
        (tmp_path / "empty").mkdir()
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))
    write_imagefolder(tmp_path / "ok")
    (tmp_path / "ok" / "train" / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    data = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "ok"), image_size=16))
    with pytest.raises(KdtoolError, match="unreadable image .*0.jpg"):
        data.train[0]
    skipping = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "ok"), image_size=16, bad_images="skip"))
    image, label = skipping.train[0]
    assert image.shape == (3, 16, 16) and skipping.train.skipped == 1


def test_unknown_dataset_lists_known():
    with pytest.raises(KdtoolError, match="unknown dataset 'digit' .*did you mean 'digits'.*known: cifar100, digits, imagefolder"):
        build_datasets(DataConfig(name="digit"))


# ------------------------------------------------------------------ what the training loop reads
class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    process_index = 0


def test_training_samples_of_one_size_are_uncropped_with_a_seeded_key():
    from kdtool.data import SeededSamples

    data = build_datasets(DataConfig(name="digits", train_fraction=0.5))
    samples = SeededSamples(data.train, seed=4)
    sample, label = samples[3]
    assert torch.equal(sample["image"], data.train.dataset.images[data.train.indices[3]])  # uncropped
    assert (sample["padding"], sample["flip"], label) == (2, False, data.train.dataset.targets[data.train.indices[3]])
    assert samples[3][0]["key"] == sample["key"] != samples[4][0]["key"]
    samples.set_epoch(1)
    assert samples[3][0]["key"] != sample["key"]


def test_cifar100_training_samples_pad_4_and_flip(tmp_path):
    from kdtool.data import SeededSamples

    write_cifar100(tmp_path)
    sample, _ = SeededSamples(build_datasets(DataConfig(name="cifar100", root=str(tmp_path))).train, seed=0)[0]
    assert sample["image"].shape == (3, 32, 32) and (sample["padding"], sample["flip"]) == (4, True)


# Sizes the two view paths must agree on: odd, 1 x N and N x 1, very wide and very tall, tiny.
MIXED_SIZES = ((41, 29), (1, 37), (33, 1), (120, 7), (6, 90), (2, 2), (53, 53), (17, 64))


def write_mixed_imagefolder(root, per_class=4):
    """JPEGs of MIXED_SIZES (smooth, so that JPEG keeps detail), with grayscale and RGBA PNG sources."""
    rng = np.random.default_rng(1)
    sizes = iter(MIXED_SIZES * 4)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = next(sizes)
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
                pixels = (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i == 1:
                    image.convert("L").save(folder / f"{i}.png")
                elif i == 2:
                    image.convert("RGBA").save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.jpg", quality=90)


@pytest.mark.parametrize("policy,p", [("imagenet", 0.6), ("cifar100", 0.6), ("cifar10", 0.6), ("rotation", 1.0),
                                      (None, 0.0)])
def test_loader_and_accelerator_views_are_pixel_identical(tmp_path, policy, p):
    """Views made per image in the workers equal views made batched on a canvas of mixed sizes."""
    from kdtool.augment import JointAugment, TrainViews
    from kdtool.data import SeededSamples

    write_mixed_imagefolder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=12, batch_size=8)
    train = build_datasets(cfg).train
    augment = JointAugment(policy, p=p) if policy else None
    joint = {}
    for where in ("loader", "accelerator"):
        views = TrainViews(augment, 2 if policy else 0, seed=0, where=where)
        samples = SeededSamples(train, 4, views.loader_views(torch.device("cpu")))
        samples.set_epoch(3)
        torch.manual_seed(0)  # the same shuffled order
        batch, labels = next(iter(build_loader(samples, cfg, train=True)))
        assert ("pixels" in batch) == (where == "accelerator")
        joint[where] = views(batch, 0, _Accelerator())
    assert joint["loader"].shape == (8 * (3 if policy else 1), 3, 12, 12)
    assert torch.equal(joint["loader"], joint["accelerator"])


def test_view_device_auto_follows_the_accelerator():
    from kdtool.augment import view_device

    assert view_device("auto", "cuda")[0] == "accelerator" and view_device("auto", "cpu")[0] == "loader"
    assert view_device("loader", "cuda")[0] == "loader" and view_device("accelerator", "cpu")[0] == "accelerator"
    with pytest.raises(KdtoolError, match="augment.jda.device"):
        view_device("gpu", "cpu")


def test_recipe_check_says_where_views_are_made_and_refuses_other_places(cli_runner):
    from conftest import one_line_error

    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    shown = cli_runner("recipe", "check", recipe, "--set", "augment.jda.device=accelerator")
    assert shown.exit_code == 0 and "made on the accelerator, batched (augment.jda.device: accelerator)" in shown.output
    auto = cli_runner("recipe", "check", recipe, "--set", "runtime.cpu=true")
    assert "made in the loader workers, one image at a time (auto: training runs on cpu" in auto.output, auto.output
    line = one_line_error(cli_runner("recipe", "check", recipe, "--set", "augment.jda.device=gpu"))
    assert "augment.jda.device" in line and "accelerator" in line, line


def test_imagefolder_training_batches_become_joint_batches(tmp_path):
    from kdtool.augment import JointAugment, TrainViews
    from kdtool.data import SeededSamples

    write_imagefolder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, batch_size=4)
    train = build_datasets(cfg).train
    views = TrainViews(JointAugment("imagenet", p=0.5), 1, seed=0, where="loader")
    batch, labels = next(iter(build_loader(SeededSamples(train, 0, views.loader_views("cpu")), cfg, train=True)))
    joint = views(batch, 0, _Accelerator())
    assert joint.shape == (8, 3, 16, 16) and joint.dtype == torch.float32 and labels.shape == (4,)
    assert torch.equal(joint[:4], batch["views"][:, 0].float() / 255)
    no_views, _ = next(iter(build_loader(SeededSamples(train, 0, TrainViews(None, 0, 0, "loader").loader_views("cpu")),
                                         cfg, train=True)))
    with pytest.raises(KdtoolError, match="in_loader"):
        views(no_views, 0, _Accelerator())


def test_imagefolder_distillation_is_identical_on_either_view_path(tmp_path, cli_runner):
    """End to end on mixed-size JPEGs: views made in the loader or on the accelerator (JPEGs decoded
    there too, by libjpeg-turbo on this CPU) give the same run (every metric but the timings), for the same seed."""
    import json

    from conftest import TINY

    write_mixed_imagefolder(tmp_path / "images", per_class=6)
    records = {}
    for where, decode in (("loader", "cpu"), ("accelerator", "cpu"), ("accelerator", "accelerator")):
        overrides = [*TINY, "data.name=imagefolder", f"data.root={tmp_path / 'images'}", "data.batch_size=4",
                     "data.train_fraction=1", "train.epochs=1", "augment.jda.policy=imagenet", "augment.jda.p=0.6",
                     f"augment.jda.device={where}", f"teacher.augment.jda.device={where}", f"data.decode={decode}"]
        result = cli_runner("distill", Path(__file__).parents[1] / "recipes" / "quickstart.yaml",
                            *sum([["--set", o] for o in overrides], []), "--out", tmp_path / f"{where}_{decode}")
        assert result.exit_code == 0, result.output
        lines = (tmp_path / f"{where}_{decode}" / "metrics.jsonl").read_text().splitlines()
        records[where, decode] = [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")} for line in lines]
    assert records["loader", "cpu"] == records["accelerator", "cpu"] == records["accelerator", "accelerator"]
    assert records["loader", "cpu"]


def test_canvases_stay_under_the_pixel_budget_and_long_images_turn_alone(monkeypatch):
    """A batch is cut into canvases of at most MAX_IMAGE_PIXELS pixels; an image too long for a
    square canvas (quarter turns) goes alone on its own canvas; the views stay the loader's."""
    import kdtool.augment.views as views
    from kdtool.augment import JointAugment, TrainViews

    monkeypatch.setattr(views, "MAX_IMAGE_PIXELS", 5000)
    rng = np.random.default_rng(0)
    sizes = np.array([(1, 3000), (40, 30), (30, 40), (3000, 1), (20, 20), (50, 60), (60, 50)])
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    pixels = torch.from_numpy(np.concatenate([image.reshape(-1) for image in images]))
    keys = np.arange(len(sizes), dtype=np.int64) * 31 + 1
    for policy, square in (("rotation", True), ("imagenet", False)):
        chunks = views._chunks(sizes, square)
        assert [i for start, end in chunks for i in range(start, end)] == list(range(len(sizes)))
        for start, end in chunks:
            side = sizes[start:end].max(0)
            area = side.max() ** 2 if square else side.prod()
            assert end - start == 1 or (end - start) * area <= 5000, (policy, start, end)
        augment = JointAugment(policy, 1.0)
        made = views.differing_size_views(pixels, sizes, keys, augment, 2, 8)
        per_image = TrainViews(augment, 2, 0, "loader").loader_views("cpu")
        expected = torch.stack([per_image(Image.fromarray(image), int(key), 8) for image, key in zip(images, keys)])
        assert torch.equal(made, expected.transpose(0, 1).reshape(-1, 3, 8, 8)), policy


# ---------------------------------------------------------------- data.decode: accelerator
def write_decode_folder(root, corrupt=False):
    """train/val of mixed-size images, and in train/cat the files `data.decode: accelerator` must
    route: a baseline RGB JPEG, a grey JPEG, a CMYK JPEG, a progressive JPEG, a PNG and (with
    `corrupt`) a JPEG cut in half and a JPEG whose header and end marker are sound but that holds
    no scan (no decoder can read it)."""
    write_mixed_imagefolder(root)
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    folder = root / "train" / "cat"
    Image.fromarray(pixels).save(folder / "a_rgb.jpg", quality=90)
    Image.fromarray(pixels[:, :, 0]).save(folder / "b_grey.jpg")
    Image.fromarray(pixels).convert("CMYK").save(folder / "c_cmyk.jpg")
    Image.fromarray(pixels).save(folder / "d_progressive.jpg", progressive=True)
    Image.fromarray(pixels).save(folder / "e_png.jpg", format="PNG")  # a PNG named .jpg: the header decides
    if corrupt:
        whole = (folder / "a_rgb.jpg").read_bytes()
        (folder / "f_truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (folder / "g_noscan.jpg").write_bytes(whole[:whole.index(b"\xff\xda")] + b"\xff\xd9")
    return root


def _decode_train(root, decode="accelerator", bad_images="fail"):
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=12, batch_size=8, decode=decode, bad_images=bad_images)
    return cfg, build_datasets(cfg).train


def test_accelerator_decoding_routes_jpegs_by_their_header(tmp_path):
    _, train = _decode_train(write_decode_folder(tmp_path, corrupt=True), bad_images="skip")
    names = [Path(path).name for path, _ in train.folder.samples]
    samples = {name: train.joint_sample(i)[0] for i, name in enumerate(names)}
    routed = {name: "encoded" in samples[name] for name in ("a_rgb.jpg", "b_grey.jpg", "c_cmyk.jpg", "d_progressive.jpg",
                                                              "e_png.jpg", "g_noscan.jpg", "1.png")}
    assert routed == {"a_rgb.jpg": True, "b_grey.jpg": True, "c_cmyk.jpg": False, "d_progressive.jpg": False,
                      "e_png.jpg": False, "g_noscan.jpg": True, "1.png": False}
    # The file cut short (no end marker) was decoded in the worker, which skipped it as today: the next file came instead.
    assert samples["f_truncated.jpg"]["index"] == names.index("g_noscan.jpg")
    assert train.skipped == 1 and bool(train.unreadable[names.index("f_truncated.jpg")])
    index = [Path(path).name for path, _ in train.folder.samples].index("a_rgb.jpg")
    sample, label = train.joint_sample(index)
    assert sample["index"] == index and tuple(sample["extent"]) == (23, 31) and label == 0


def _first_batches(train, cfg, views, n=2):
    from kdtool.data import SeededSamples

    samples = SeededSamples(train, 4, views.loader_views(torch.device("cpu")))
    torch.manual_seed(0)  # the same shuffled order
    return [(batch, views(batch, 0, _Accelerator())) for batch, _ in list(build_loader(samples, cfg, train=True))[:n]]


def test_batches_decoded_on_the_accelerator_equal_the_cpu_decoder(tmp_path):
    """torchvision's libjpeg-turbo (the accelerator's decoder on a CPU device) gives Pillow's pixels:
    the joint batches are the same with either data.decode."""
    from kdtool.augment import JointAugment, TrainViews

    root = write_decode_folder(tmp_path)
    views = TrainViews(JointAugment("imagenet", p=0.6), 1, seed=0, where="accelerator")
    made = {}
    for decode in ("cpu", "accelerator"):
        cfg, train = _decode_train(root, decode)
        made[decode] = _first_batches(train, cfg, views.reading(train))
    assert all("encoded" in batch for batch, _ in made["accelerator"]) and not any("encoded" in b for b, _ in made["cpu"])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(made["cpu"], made["accelerator"]))


def test_files_the_accelerator_cannot_decode_fall_back_to_the_cpu(tmp_path):
    """An injected decoder that fails on some files: the whole batch is retried one file at a
    time, and the files it still fails on are decoded by Pillow, giving the same pixels."""
    from kdtool.data import collate_samples, decode_fallback, decode_jpegs, decode_on_device

    cfg, train = _decode_train(write_decode_folder(tmp_path))
    samples = [train.joint_sample(i) for i in range(len(train))]
    batch, _ = collate_samples(samples)
    calls = []

    def refuses_grey(encoded, device):
        calls.append(len(encoded))
        if any(Image.open(io.BytesIO(e.numpy().tobytes())).mode == "L" for e in encoded):
            raise RuntimeError("nvjpeg refused it")
        return decode_jpegs(encoded, device)

    cpu = torch.cat([torch.from_numpy(np.array(train.folder.loader(path))).reshape(-1) for path, _ in train.folder.samples])
    assert torch.equal(decode_on_device(batch, torch.device("cpu"), decode_fallback(train), refuses_grey), cpu)
    n_encoded = len(batch["encoded_length"])
    assert calls == [n_encoded] + [1] * n_encoded and n_encoded >= 2
    with pytest.raises(KdtoolError, match="no CPU fallback"):
        decode_on_device(batch, torch.device("cpu"), None, refuses_grey)


def test_corrupt_jpegs_on_the_accelerator_fail_or_are_skipped_and_counted(tmp_path):
    from kdtool.data import collate_samples, decode_fallback, decode_on_device

    root = write_decode_folder(tmp_path, corrupt=True)
    (root / "train" / "cat" / "f_truncated.jpg").unlink()  # the worker's own case (tests above)
    for bad_images in ("fail", "skip"):
        cfg, train = _decode_train(root, bad_images=bad_images)
        names = [Path(path).name for path, _ in train.folder.samples]
        batch, labels = collate_samples([train.joint_sample(i) for i in range(len(train))])
        if bad_images == "fail":
            with pytest.raises(KdtoolError, match="unreadable image .*g_noscan.jpg.*data.bad_images"):
                decode_on_device(batch, torch.device("cpu"), decode_fallback(train))
            continue
        pixels = decode_on_device(batch, torch.device("cpu"), decode_fallback(train))
        assert train.skipped == 1 and bool(train.unreadable[names.index("g_noscan.jpg")])
        hw = batch["extent"].numpy()
        offsets = np.concatenate([[0], np.cumsum(hw[:, 0] * hw[:, 1] * 3)])
        row = names.index("g_noscan.jpg")
        assert len(pixels) == offsets[-1] and len(labels) == len(names)
        assert bool((pixels[offsets[row]:offsets[row + 1]] == 128).all())  # replaced by grey of its size, label kept


def test_accelerator_decoding_is_refused_where_it_has_no_effect(tmp_path, cli_runner):
    from conftest import one_line_error
    from kdtool.augment import TrainViews
    from kdtool.data import SeededSamples

    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    line = one_line_error(cli_runner("recipe", "check", recipe, "--set", "data.decode=accelerator"))
    assert "decode" in line and "'digits'" in line, line
    root = write_decode_folder(tmp_path / "images")
    folder = ["--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set", "data.decode=accelerator",
              "--set", "data.batch_size=4"]
    line = one_line_error(cli_runner("recipe", "check", recipe, *folder, "--set", "augment.jda.device=loader"))
    assert "data.decode" in line and "augment.jda.device: loader" in line, line
    result = cli_runner("recipe", "check", recipe, *folder, "--set", "augment.jda.device=accelerator")
    assert result.exit_code == 0, result.output
    _, train = _decode_train(root)
    with pytest.raises(KdtoolError, match="data.decode: accelerator needs the JDA views made on the accelerator"):
        SeededSamples(train, 0, TrainViews(None, 0, 0, "loader").loader_views("cpu"))
