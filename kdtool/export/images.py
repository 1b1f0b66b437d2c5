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

from kdtool.data import DataInfo, build_loader, normalize
from kdtool.errors import KdtoolError
from kdtool.recipe import DataConfig

PREPROCESSING = "uint8 /255 then (x-mean)/std"


def preprocess(images_uint8: torch.Tensor, info: DataInfo) -> np.ndarray:
    """uint8 (N, 3, H, W) images -> normalised float32 numpy, as the trainer does it."""
    return normalize(images_uint8, info).numpy().astype(np.float32, copy=False)


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
