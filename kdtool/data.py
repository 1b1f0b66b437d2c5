"""Datasets and transforms: the embedded digits, CIFAR-100 and ImageFolder (ImageNet layout).

Every dataset yields ``(uint8 tensor (3, H, W), int label)``. Normalisation is not done here: the
trainer and evaluators run it on the device, after JDA, with the `DataInfo` mean/std, so that
augmentation works on plain [0, 1] images as the method requires.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from kdtool.errors import KdtoolError, Registry
from kdtool.recipe import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class DataInfo:
    """What a model, an exporter and a deployer need to know about the data."""

    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    info: DataInfo


class TensorImages(Dataset):
    """In-memory uint8 images (N, 3, H, W) and labels, with an optional per-image transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def normalize(images: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float, on the images' device."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean = torch.tensor(info.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def stratified_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a seeded, stratified `fraction` of the samples (all when fraction == 1)."""
    if fraction >= 1:
        return list(range(len(targets)))
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(targets))
    n_classes = len(set(targets))
    keep = max(int(round(fraction * len(targets))), n_classes)
    if keep >= len(targets):
        return indices.tolist()
    chosen, _ = train_test_split(indices, train_size=keep, stratify=np.asarray(targets), random_state=seed)
    return sorted(chosen.tolist())


# ------------------------------------------------------------------ digits (embedded)
def _digits(cfg: DataConfig) -> Datasets:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.val_fraction, stratify=bunch.target, random_state=cfg.split_seed
    )
    train_images = images[torch.from_numpy(train_idx)]
    mean = tuple(train_images.float().div(255).mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_images.float().div(255).std(dim=(0, 2, 3)).tolist())
    pad = max(1, cfg.image_size // 16)
    train = TensorImages(train_images, labels[torch.from_numpy(train_idx)], v2.RandomCrop(cfg.image_size, padding=pad))
    val = TensorImages(images[torch.from_numpy(val_idx)], labels[torch.from_numpy(val_idx)])
    info = DataInfo(10, tuple(str(c) for c in bunch.target_names), cfg.image_size, mean, std)
    return Datasets(train, val, info)


# ------------------------------------------------------------------ CIFAR-100 (torchvision's files)
def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise KdtoolError(f"data.root is required for dataset {cfg.name!r}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir() and not cfg.download:
        raise KdtoolError(f"data.root: dataset root not found: {root}")
    return root


def _local_cifar100():
    from torchvision.datasets import CIFAR100

    class LocalCIFAR100(CIFAR100):
        """torchvision's CIFAR-100 reader without the per-file MD5 checks.

        torchvision compares every file with the official archive's MD5, which rejects subset or
        re-packed copies in the same format; the download itself is still checked, and a
        truncated file still fails when it is unpickled.
        """

        train_list = [[name, None] for name, _ in CIFAR100.train_list]
        test_list = [[name, None] for name, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

        @property
        def source(self) -> Path:
            """The file the labels were read from."""
            return Path(self.root) / self.base_folder / (self.train_list if self.train else self.test_list)[0][0]

    return LocalCIFAR100


def _cifar100(cfg: DataConfig) -> Datasets:
    CIFAR100 = _local_cifar100()
    root = _require_root(cfg)
    size = cfg.image_size
    train_tf = v2.Compose([v2.PILToTensor(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.Resize(size, antialias=True)])
    val_tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True)])
    try:
        train = CIFAR100(str(root), train=True, transform=train_tf, download=cfg.download)
        val = CIFAR100(str(root), train=False, transform=val_tf, download=cfg.download)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as exc:  # missing or corrupt files
        raise KdtoolError(f"data.root: CIFAR-100 files under {root} are missing or unreadable ({exc}); data.download: true fetches them") from None
    return Datasets(train, val, DataInfo(100, tuple(train.classes), size, CIFAR100_MEAN, CIFAR100_STD))


# ------------------------------------------------------------------ ImageFolder (ImageNet layout)
class CheckedImageFolder(Dataset):
    """torchvision ImageFolder that fails fast, or skips and counts, on unreadable images.

    Skipped files are flagged in `unreadable`, a shared-memory tensor, so that flags set in
    DataLoader workers reach the trainer; setting a flag twice is harmless, so workers need no lock.
    """

    def __init__(self, root: Path, transform: Callable, bad_images: str):
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root))
        except FileNotFoundError as exc:
            empty = _empty_class_folders(root)
            if empty:
                raise KdtoolError(f"data.root: class folder {empty[0]} holds no images"
                                  f"{f' (nor do {len(empty) - 1} more)' if len(empty) > 1 else ''}") from None
            raise KdtoolError(f"data.root: {root}: {exc}") from None
        except RuntimeError as exc:
            raise KdtoolError(f"data.root: {root}: {exc}") from None
        self.transform, self.bad_images = transform, bad_images
        self.unreadable = torch.zeros(len(self.folder), dtype=torch.bool).share_memory_()
        self.classes, self.targets = self.folder.classes, self.folder.targets

    @property
    def skipped(self) -> int:
        """How many distinct files were skipped as unreadable since the flags were last cleared."""
        return int(self.unreadable.sum())

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path, label = self.folder.samples[index]
        for _ in range(len(self.folder)):
            try:
                return self.transform(self.folder.loader(path)), label
            except OSError as exc:
                if self.bad_images == "fail":
                    raise KdtoolError(f"unreadable image {path}: {exc} (set data.bad_images: skip to skip such files)") from None
                self.unreadable[index] = True
                index = (index + 1) % len(self.folder)
                path, label = self.folder.samples[index]
        raise KdtoolError(f"no readable image under {self.folder.root}")


def _empty_class_folders(root: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return [folder for folder in sorted(Path(root).iterdir()) if folder.is_dir()
            and not any(f.suffix.lower() in IMG_EXTENSIONS for f in folder.rglob("*") if f.is_file())]


def _imagefolder(cfg: DataConfig) -> Datasets:
    root = _require_root(cfg)
    size = cfg.image_size
    train_tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    val_tf = v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size), v2.PILToTensor()])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise KdtoolError(f"data.root: {root / split} not found (ImageFolder expects train/ and val/ class folders)")
    train = CheckedImageFolder(root / "train", train_tf, cfg.bad_images)
    val = CheckedImageFolder(root / "val", val_tf, cfg.bad_images)
    if train.classes != val.classes:
        raise KdtoolError(f"data.root: {root}: train/ and val/ hold different class folders")
    return Datasets(train, val, DataInfo(len(train.classes), tuple(train.classes), size, IMAGENET_MEAN, IMAGENET_STD))


DATASETS: Registry[Callable[[DataConfig], Datasets]] = Registry(
    "dataset", {"digits": _digits, "cifar100": _cifar100, "imagefolder": _imagefolder}
)


def check_labels(dataset: Dataset, num_classes: int, where: str) -> None:
    """KdtoolError naming `where` (or the dataset's `source` file) when a label is outside 0..num_classes-1."""
    targets = torch.as_tensor(dataset.targets)
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if len(bad):
        where = getattr(dataset, "source", where)
        raise KdtoolError(f"{where}: label {int(bad[0])} is out of range for {num_classes} classes (0..{num_classes - 1}); "
                          f"{len(bad)} such label(s)")


def build_datasets(cfg: DataConfig) -> Datasets:
    """Train/val datasets for a recipe's `data` section, the few-shot fraction applied to train."""
    datasets = DATASETS[cfg.name](cfg)
    for split, dataset in (("train", datasets.train), ("val", datasets.val)):
        check_labels(dataset, datasets.info.num_classes, f"data: {cfg.name} {split} set")
    if cfg.train_fraction < 1:
        keep = stratified_subset(datasets.train.targets, cfg.train_fraction, cfg.split_seed)
        datasets.train = Subset(datasets.train, keep)
    return datasets


class SeededSamples(Dataset):
    """A training set whose random transforms are a pure function of (seed, epoch, index).

    Batches then depend neither on torch's global RNG nor on workers or prefetching, so a run stopped
    mid-epoch resumes to the very same batches. The trainer calls `set_epoch` before each epoch.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # The CPU generator alone (what transforms draw from): torch.manual_seed also seeds every
        # accelerator backend, ~100x slower, and this runs once per image.
        generator = torch.default_generator
        outside = generator.get_state()
        generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % 2**63)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(outside)


def unreadable_flags(dataset: Dataset) -> torch.Tensor | None:
    """The shared per-file flags of images skipped as unreadable, or None for a dataset that never skips."""
    while isinstance(dataset, (Subset, SeededSamples)):
        dataset = dataset.dataset
    return dataset.unreadable if isinstance(dataset, CheckedImageFolder) and dataset.bad_images == "skip" else None


def build_loader(dataset: Dataset, cfg: DataConfig, *, train: bool, batch_size: int | None = None) -> DataLoader:
    """A DataLoader with the recipe's worker and pinned-memory settings (shuffled, full batches for training)."""
    return DataLoader(
        dataset,
        batch_size=batch_size or (cfg.batch_size if train else cfg.eval_batch_size),
        shuffle=train,
        drop_last=train,
        num_workers=cfg.workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        # Persistent workers would keep a copy of the training set from before its `set_epoch`.
        persistent_workers=cfg.workers > 0 and not train,
    )
