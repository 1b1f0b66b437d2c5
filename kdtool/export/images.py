"""Real images for export checks: calibration picks from the training set, validation batches.

Images are preprocessed exactly as in training (uint8 -> /255 -> (x - mean) / std, with
`kdtool.data.normalize`) and handed to ONNX Runtime as float32 NCHW numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from kdtool.bundle import PREPROCESSING  # noqa: F401  (re-exported; defined with the bundle layout)
from kdtool.data import DataInfo, build_loader, normalize
from kdtool.errors import KdtoolError
from kdtool.recipe import DataConfig


def preprocess(images_uint8: torch.Tensor, info: DataInfo) -> np.ndarray:
    """uint8 (N, 3, H, W) images -> normalised float32 numpy, as the trainer does it."""
    return normalize(images_uint8, info).numpy().astype(np.float32, copy=False)


def first_images(dataset: Dataset, data_cfg: DataConfig, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of `dataset` in loader order, as uint8 (N, 3, H, W), and their labels (int64)."""
    images, labels = [], []
    for batch_images, batch_labels in build_loader(dataset, data_cfg, train=False):
        if batch_images.dtype != torch.uint8:  # [0, 1] float images: back to the uint8 grid they were read from
            batch_images = batch_images.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        if sum(len(b) for b in images) >= count:
            break
    if not images:
        raise KdtoolError("the validation set is empty")
    return (np.ascontiguousarray(np.concatenate(images)[:count], dtype=np.uint8),
            np.concatenate(labels)[:count].astype(np.int64))


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration images and where they came from."""

    images: np.ndarray
    indices: list[int]
    seed: int


def calibration_set(train: Dataset, info: DataInfo, count: int, seed: int) -> CalibrationSet:
    """`count` training images chosen by a seeded permutation, their transforms drawn under a fixed seed."""
    if count > len(train):
        raise KdtoolError(
            f"export.int8.calibration_images: {count} asked but the training set holds only {len(train)} images"
        )
    indices = sorted(np.random.default_rng(seed).permutation(len(train))[:count].tolist())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # training transforms (random crops) become deterministic
        images = torch.stack([train[i][0] for i in indices])
    return CalibrationSet(preprocess(images, info), indices, seed)


@dataclass(frozen=True)
class ValidationBatches:
    """The whole validation set as re-iterable (preprocessed images, labels) numpy batches."""

    dataset: Dataset
    info: DataInfo
    data_cfg: DataConfig

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for images, labels in build_loader(self.dataset, self.data_cfg, train=False):
            yield preprocess(images, self.info), labels.numpy()

    def __len__(self) -> int:
        return len(self.dataset)

    def head(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` images (fewer if the set is smaller), preprocessed, and their labels."""
        images, labels = [], []
        for batch_images, batch_labels in self:
            images.append(batch_images)
            labels.append(batch_labels)
            if sum(len(b) for b in images) >= count:
                break
        return np.concatenate(images)[:count], np.concatenate(labels)[:count]
