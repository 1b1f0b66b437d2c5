"""Dataset loaders on data in the real on-disk formats, written by the tests."""
from __future__ import annotations

import pickle
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
