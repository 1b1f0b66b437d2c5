"""Dataset loaders on data in the real on-disk formats, written by the tests."""
from __future__ import annotations

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


def test_imagefolder_views_are_made_in_the_loader_on_the_full_image(tmp_path):
    """Each view is the chain on the whole decoded image, then the dataset's crop; the sample holds the stack."""
    from torchvision.transforms import v2

    from kdtool.augment import JointAugment, LoaderViews
    from kdtool.data import CheckedImageFolder, SeededSamples

    write_imagefolder(tmp_path, size=(40, 30))
    fixed = v2.Compose([v2.PILToTensor(), v2.Resize(24, antialias=True), v2.CenterCrop(24)])  # no randomness
    folder = CheckedImageFolder(tmp_path / "train", fixed, "fail")
    samples = SeededSamples(folder, seed=0, in_loader=LoaderViews(JointAugment("rotation"), 2))
    sample, label = samples[5]
    full = v2.functional.pil_to_tensor(Image.open(folder.folder.samples[5][0]).convert("RGB"))
    assert sample["views"].shape == (3, 3, 24, 24) and label == 1
    assert torch.equal(sample["views"][0], fixed(full))
    turned = [fixed(torch.rot90(full, k, (1, 2))) for k in (1, 2, 3)]  # turned before the crop
    for view in sample["views"][1:]:
        assert any(torch.equal(view, candidate) for candidate in turned)
    assert torch.equal(samples[5][0]["views"], sample["views"])


def test_imagefolder_training_batches_become_joint_batches(tmp_path):
    from kdtool.augment import JointAugment, TrainViews
    from kdtool.data import SeededSamples

    write_imagefolder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, batch_size=4)
    train = build_datasets(cfg).train
    views = TrainViews(JointAugment("imagenet", p=0.5), 1, seed=0)
    batch, labels = next(iter(build_loader(SeededSamples(train, 0, views.in_loader), cfg, train=True)))
    joint = views(batch, 0, _Accelerator())
    assert joint.shape == (8, 3, 16, 16) and joint.dtype == torch.float32 and labels.shape == (4,)
    assert torch.equal(joint[:4], batch["views"][:, 0].float() / 255)
    plain, _ = next(iter(build_loader(SeededSamples(train, 0), cfg, train=True)))
    with pytest.raises(KdtoolError, match="in_loader"):
        views(plain, 0, _Accelerator())


def test_imagefolder_distillation_with_jda(tmp_path, cli_runner):
    """End to end: ImageFolder images of differing sizes get their JDA views in the loader workers."""
    from conftest import TINY

    write_imagefolder(tmp_path / "images", per_class=6)
    overrides = [*TINY, "data.name=imagefolder", f"data.root={tmp_path / 'images'}", "data.batch_size=4",
                 "data.train_fraction=1", "train.epochs=1", "augment.jda.policy=imagenet"]
    result = cli_runner("distill", Path(__file__).parents[1] / "recipes" / "quickstart.yaml",
                        *sum([["--set", o] for o in overrides], []), "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
