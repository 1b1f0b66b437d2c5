"""Datasets and transforms: the embedded digits, CIFAR-100 and ImageFolder (ImageNet layout).

Every dataset yields ``(uint8 tensor (3, H, W), int label)``: the validation sets their fixed
transform, the training sets one draw of their own random transform (random crop, flip). The
training loop instead reads a training set through :class:`SeededSamples`, which yields what
JDA needs to make views in the paper's order (the chain on the uncropped image, then the
dataset's random transform drawn anew for the original and for each view; kdtool.augment):

- images of one size (digits, CIFAR-100): ``{"image": uncropped uint8 (3, H, W), "key": int,
  "padding": int, "flip": bool}``: the crops, flips and the chain are made on the batch;
- images of differing sizes (ImageFolder), views made on the accelerator: ``{"pixels": decoded
  uint8 numpy (h, w, 3), "key": int, "size": S}``, which :func:`collate_samples` packs one after the
  other with each image's (h, w) as ``"extent"``: the workers only read and decode;
  with ``data.decode: accelerator``, a JPEG the accelerator can decode comes as ``{"encoded": its
  bytes, "extent": (h, w) from its header, "index", "key", "size"}`` instead (the worker only reads
  it), decoded batched on the training device by :func:`decode_on_device`;
- the same, views made in the loader (``augment.jda.device: loader``, the default without CUDA):
  ``{"views": uint8 (1 + V, 3, S, S)}``, made by the `in_loader` callable on the decoded image.

One image may hold at most MAX_IMAGE_PIXELS pixels (larger ones are unreadable images,
``data.bad_images``), which bounds the canvas the accelerator path puts images on.

Normalisation is not done here: the trainer and evaluators run it on the device, after JDA, with
the `DataInfo` mean/std, so that augmentation works on plain [0, 1] images as the method requires.
"""
from __future__ import annotations

import builtins
import codecs
import io
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.transforms import v2

from kdtool.errors import KdtoolError, Registry
from kdtool.recipe import MAX_SEED, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# Pixels (height x width) of the largest training image kdtool reads: 2**25 (e.g. 8192 x 4096).
# The accelerator path's canvas holds at most this many pixels per channel (96 MiB of uint8 RGB).
MAX_IMAGE_PIXELS = 2**25


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


def _sample_key() -> int:
    """One random key per sample from torch's default generator (SeededSamples seeds it per
    (seed, epoch, index)); every random draw of the sample's views derives from it."""
    return int(torch.randint(0, 2**62, ()))


@dataclass(frozen=True)
class RandomCropFlip:
    """The random transform of a dataset whose images share one size: torchvision's
    RandomCrop(size, padding) (zero fill), then a horizontal flip with probability 0.5 if `flip`."""

    padding: int
    flip: bool

    def transform(self, size: int) -> Callable:
        crop = v2.RandomCrop(size, padding=self.padding)
        return v2.Compose([crop, v2.RandomHorizontalFlip()]) if self.flip else crop


class TensorImages(Dataset):
    """In-memory uint8 images (N, 3, H, W) and labels. A training set names its `crop`; `size`
    resizes each image when it differs (the images stay in memory at their own size)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop: Optional[RandomCropFlip] = None,
                 size: Optional[int] = None, source: Optional[Path] = None):
        self.images, self.labels, self.crop, self.source = images, labels, crop, source
        self.size = size or images.shape[-1]
        self.targets = labels.tolist()
        self._transform = crop.transform(self.size) if crop else None

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if tuple(image.shape[-2:]) != (self.size, self.size):
            image = v2.functional.resize(image, [self.size, self.size], antialias=True)
        return image

    def __getitem__(self, index: int):
        image = self._image(index)
        return (self._transform(image) if self._transform else image), int(self.labels[index])

    def joint_sample(self, index: int, in_loader: Optional[Callable] = None):
        """The uncropped image, its key and the crop to make views with (`in_loader` unused:
        images of one size get their views on the batch)."""
        crop = self.crop or RandomCropFlip(0, False)
        sample = {"image": self._image(index), "key": _sample_key(), "padding": crop.padding, "flip": crop.flip}
        return sample, int(self.labels[index])


def normalize(images: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float, on the images' device."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean = torch.tensor(info.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def _check_split_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise KdtoolError(f"data.split_seed: {seed} is out of range; use 0..{MAX_SEED}")


def stratified_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a seeded, stratified `fraction` of the samples (all when fraction == 1)."""
    if fraction >= 1:
        return list(range(len(targets)))
    from sklearn.model_selection import train_test_split

    _check_split_seed(seed)
    indices = np.arange(len(targets))
    n_classes = len(set(targets))
    keep = max(int(round(fraction * len(targets))), n_classes)
    if keep >= len(targets):
        return indices.tolist()
    chosen, _ = train_test_split(indices, train_size=keep, stratify=np.asarray(targets), random_state=seed)
    return sorted(chosen.tolist())


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a seeded split that keeps every class on both sides, or a
    KdtoolError naming data.val_fraction / data.split_seed."""
    from sklearn.model_selection import train_test_split

    _check_split_seed(seed)
    n_classes = len(np.unique(labels))
    try:
        train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed)
    except ValueError as exc:  # a class too small, or a side smaller than the number of classes
        raise KdtoolError(f"data.val_fraction: {val_fraction} cannot split {len(labels)} images of {n_classes} "
                          f"classes with every class on both sides ({exc})") from None
    for side, indices in (("training", train), ("validation", val)):
        present = len(np.unique(labels[indices]))
        if present < n_classes:
            raise KdtoolError(f"data.val_fraction: {val_fraction} leaves the {side} split with {len(indices)} "
                              f"image(s) of {present} of the {n_classes} classes")
    return train, val


# ------------------------------------------------------------------ digits (embedded)
def _digits(cfg: DataConfig) -> Datasets:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    train_idx, val_idx = (torch.from_numpy(i) for i in stratified_split(bunch.target, cfg.val_fraction, cfg.split_seed))
    train_images = images[train_idx]
    mean = tuple(train_images.float().div(255).mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_images.float().div(255).std(dim=(0, 2, 3)).tolist())
    # Digits are not mirror-symmetric: a random crop, no flip.
    crop = RandomCropFlip(padding=max(1, cfg.image_size // 16), flip=False)
    train = TensorImages(train_images, labels[train_idx], crop)
    val = TensorImages(images[val_idx], labels[val_idx])
    info = DataInfo(10, tuple(str(c) for c in bunch.target_names), cfg.image_size, mean, std)
    return Datasets(train, val, info)


# ------------------------------------------------------------------ CIFAR-100 (the python version's files)
def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise KdtoolError(f"data.root is required for dataset {cfg.name!r}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir() and not cfg.download:
        raise KdtoolError(f"data.root: dataset root not found: {root}")
    return root


def _numpy_core():
    return getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core


# Everything the official files (Python 2 pickles of dicts, numpy uint8 arrays) and re-packed
# copies made with Python 3 need: numpy array and dtype reconstruction, bytes from text, and
# built-in containers. Any other global is refused, so unpickling cannot run code.
_CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    **{(module, "_reconstruct"): lambda: _numpy_core().multiarray._reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
    **{(module, name): (lambda name=name: getattr(builtins, name))
       for module in ("builtins", "__builtin__") for name in ("list", "dict", "tuple", "set", "frozenset", "bytearray")},
}


class _CifarUnpickler(pickle.Unpickler):
    """An allow-list unpickler: only the globals of `_CIFAR_GLOBALS` resolve."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return _CIFAR_GLOBALS[module, name]()
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (not part of a CIFAR-100 file)")


def _read_cifar_file(path: Path) -> dict:
    """A CIFAR-100 python file's dict, read with the allow-list unpickler."""
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise KdtoolError(f"data.root: {path} not found (CIFAR-100 python files expected; "
                          f"data.download: true fetches them)") from None
    except Exception as exc:  # any malformed pickle: truncated, refused global, bad opcode, ...
        raise KdtoolError(f"data.root: {path} is not a readable CIFAR-100 python file "
                          f"({type(exc).__name__}: {exc})") from None
    if not isinstance(content, dict):
        raise KdtoolError(f"data.root: {path} is not a CIFAR-100 python file (holds a {type(content).__name__})")
    return content


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) and fine labels of one CIFAR-100 batch file."""
    content = _read_cifar_file(path)
    data, labels = content.get("data"), content.get("fine_labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data) and all(isinstance(v, int) for v in labels)):
        raise KdtoolError(f"data.root: {path} is not a CIFAR-100 batch ('data' uint8 (N, 3072) and N int 'fine_labels')")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.long)


def _cifar_class_names(path: Path) -> tuple[str, ...]:
    names = _read_cifar_file(path).get("fine_label_names")
    if not (isinstance(names, list) and len(names) == 100 and all(isinstance(n, str) for n in names)):
        raise KdtoolError(f"data.root: {path} is not CIFAR-100's meta file (100 'fine_label_names')")
    return tuple(names)


def _download_cifar100(root: Path) -> None:
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    # The archive is checked against the official MD5 before it is extracted.
    download_and_extract_archive(CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)


def _cifar100(cfg: DataConfig) -> Datasets:
    folder = _require_root(cfg) / "cifar-100-python"
    if cfg.download and not all((folder / name).is_file() for name in ("train", "test", "meta")):
        _download_cifar100(folder.parent)
    train_images, train_labels = _cifar_batch(folder / "train")
    val_images, val_labels = _cifar_batch(folder / "test")
    names = _cifar_class_names(folder / "meta")
    size = cfg.image_size
    # The authors' CIFAR transform: RandomCrop(32, padding=4) + flip (padding scaled with the size).
    crop = RandomCropFlip(padding=round(4 * size / 32), flip=True)
    train = TensorImages(train_images, train_labels, crop, size, source=folder / "train")
    val = TensorImages(val_images, val_labels, size=size, source=folder / "test")
    return Datasets(train, val, DataInfo(100, names, size, CIFAR100_MEAN, CIFAR100_STD))


# ------------------------------------------------------------------ ImageFolder (ImageNet layout)
def _refuse_repeated_folders(class_dir: Path) -> None:
    """KdtoolError when a directory link inside a class folder reaches a folder a second time
    (a loop, or two links to one folder): its images would be counted again and again."""
    seen: dict[str, str] = {}
    for folder, _, _ in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            raise KdtoolError(f"data.root: {folder} is {seen[real]} again (a directory link that loops or repeats "
                              f"a folder); its images would be counted more than once: remove the link")
        seen[real] = folder


def _folder_reader():
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import make_dataset

    class NoRepeatsImageFolder(ImageFolder):
        """torchvision's ImageFolder that refuses directory links repeating a folder inside a class."""

        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            for name in class_to_idx:
                _refuse_repeated_folders(Path(directory) / name)
            return make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)

    return NoRepeatsImageFolder


# What Pillow raises on an image it cannot read: OSError (truncated, unknown format) and, for an
# image larger than Image.MAX_IMAGE_PIXELS * 2, DecompressionBombError (not an OSError).
_UNREADABLE = (OSError, Image.DecompressionBombError)


class TooLargeImage(OSError):
    """An image of more than MAX_IMAGE_PIXELS pixels (read as unreadable)."""


def _check_pixels(image: Image.Image) -> Image.Image:
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise TooLargeImage(f"{image.width}x{image.height} is more than kdtool's {MAX_IMAGE_PIXELS} pixels per image")
    return image


class CheckedImageFolder(Dataset):
    """torchvision ImageFolder that fails fast, or skips and counts, on unreadable images.

    Skipped files are flagged in `unreadable`, a shared-memory tensor, so that flags set in
    DataLoader workers reach the trainer; setting a flag twice is harmless, so workers need no lock.
    `transform` takes a PIL image or a uint8 tensor to uint8 (3, S, S); `size` is S.
    """

    def __init__(self, root: Path, transform: Callable, bad_images: str, size: int, decode: str = "cpu"):
        try:
            self.folder = _folder_reader()(str(root))
        except FileNotFoundError as exc:
            empty = _empty_class_folders(root)
            if empty:
                raise KdtoolError(f"data.root: class folder {empty[0]} holds no images"
                                  f"{f' (nor do {len(empty) - 1} more)' if len(empty) > 1 else ''}") from None
            raise KdtoolError(f"data.root: {root}: {exc}") from None
        except RuntimeError as exc:
            raise KdtoolError(f"data.root: {root}: {exc}") from None
        self.transform, self.bad_images, self.size, self.decode = transform, bad_images, size, decode
        self.unreadable = torch.zeros(len(self.folder), dtype=torch.bool).share_memory_()
        self.classes, self.targets = self.folder.classes, self.folder.targets

    @property
    def skipped(self) -> int:
        """How many distinct files were skipped as unreadable since the flags were last cleared."""
        return int(self.unreadable.sum())

    def __len__(self) -> int:
        return len(self.folder)

    def _unreadable(self, index: int, path: str, exc: Exception) -> None:
        """bad_images 'fail': the KdtoolError naming the file; 'skip': the file flagged."""
        if self.bad_images == "fail":
            raise KdtoolError(f"unreadable image {path}: {exc} (set data.bad_images: skip to skip such files)") from None
        self.unreadable[index] = True

    def _load(self, index: int, read: Optional[Callable[[str], object]] = None) -> tuple[object, int, int]:
        """`read`(path) of the file at `index` (default: the decoded image), its label and the index
        it came from; with bad_images 'skip', of the next readable file."""
        for _ in range(len(self.folder)):
            path, label = self.folder.samples[index]
            try:
                if read is not None:
                    return read(path), label, index
                with Image.open(path) as opened:  # its size is in the header: refuse before decoding
                    _check_pixels(opened)
                return self.folder.loader(path), label, index
            except _UNREADABLE as exc:
                self._unreadable(index, path, exc)
                index = (index + 1) % len(self.folder)
        raise KdtoolError(f"no readable image under {self.folder.root}")

    def decode_fallback(self, index: int, encoded: np.ndarray) -> Optional[np.ndarray]:
        """The file at `index`, whose bytes the accelerator could not decode, decoded by Pillow
        (uint8 (h, w, 3)); unreadable: fails (bad_images 'fail') or is flagged and gives None."""
        try:
            return np.array(_decode_bytes(encoded.tobytes()))
        except _UNREADABLE as exc:
            self._unreadable(index, self.folder.samples[index][0], exc)
            return None

    def __getitem__(self, index: int):
        image, label, _ = self._load(index)
        return self.transform(image), label

    def joint_sample(self, index: int, in_loader: Optional[Callable] = None):
        """The decoded image and its key for views made on the accelerator: ({"pixels": uint8 numpy
        (h, w, 3), "key", "size"}, label), or with decode 'accelerator' for a JPEG it can take, its
        bytes instead: ({"encoded": uint8 numpy, "extent": (h, w), "index", "key", "size"}, label);
        with `in_loader` (image, key, size) -> views, the views made here: ({"views": uint8
        (1 + V, 3, S, S)}, label)."""
        if in_loader is not None:
            image, label, _ = self._load(index)
            return {"views": in_loader(image, _sample_key(), self.size)}, label
        if self.decode == "accelerator":
            sample, label, index = self._load(index, _read_for_the_accelerator)
            if "encoded" in sample:
                sample["index"] = index
        else:
            image, label, _ = self._load(index)
            sample = {"pixels": np.asarray(image)}
        return {**sample, "key": _sample_key(), "size": self.size}, label  # pixels read-only: collate copies them once


def _decode_bytes(data: bytes) -> Image.Image:
    """A file's bytes decoded to RGB by Pillow, as torchvision's ImageFolder loader does; larger
    than MAX_IMAGE_PIXELS refused from the header."""
    with Image.open(io.BytesIO(data)) as opened:
        return _check_pixels(opened).convert("RGB")


def accelerator_takes(image: Image.Image, data: bytes) -> bool:
    """Whether a file (its bytes, and opened by Pillow: the header only) is a JPEG the accelerator
    decodes: baseline (not progressive), RGB (YCbCr) or grey, ending with its end-of-image marker.
    CMYK/YCCK, progressive and non-JPEG files are decoded on the CPU (nvJPEG's hardware decoder
    takes baseline only; torchvision's CUDA decoder takes no CMYK), and so are files cut short (no
    end marker), which Pillow refuses as the CPU path does."""
    return (image.format == "JPEG" and image.mode in ("RGB", "L") and not image.info.get("progressive")
            and data.endswith(b"\xff\xd9"))


def _read_for_the_accelerator(path: str) -> dict:
    """A file read in a worker for `data.decode: accelerator`: a JPEG the accelerator takes as its
    bytes and (h, w) from the header; any other file decoded here: {"pixels"}."""
    with open(path, "rb") as handle:
        data = handle.read()
    with Image.open(io.BytesIO(data)) as opened:  # the header only
        _check_pixels(opened)
        if accelerator_takes(opened, data):
            return {"encoded": np.frombuffer(data, dtype=np.uint8), "extent": (opened.height, opened.width)}
    return {"pixels": np.asarray(_decode_bytes(data))}


def _empty_class_folders(root: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return [folder for folder in sorted(Path(root).iterdir()) if folder.is_dir()
            and not any(f.suffix.lower() in IMG_EXTENSIONS for f in folder.rglob("*") if f.is_file())]


def _imagefolder(cfg: DataConfig) -> Datasets:
    root = _require_root(cfg)
    size = cfg.image_size
    # PILToTensor first: the same transforms then crop a decoded PIL image or a JDA view (uint8 tensor).
    train_tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    val_tf = v2.Compose([v2.PILToTensor(), v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise KdtoolError(f"data.root: {root / split} not found (ImageFolder expects train/ and val/ class folders)")
    train = CheckedImageFolder(root / "train", train_tf, cfg.bad_images, size, cfg.decode)
    val = CheckedImageFolder(root / "val", val_tf, cfg.bad_images, size)
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
        where = getattr(dataset, "source", None) or where
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


def _innermost(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    """The dataset under any Subsets, and the index there."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset, index


class SeededSamples(Dataset):
    """A training set read for training: samples whose randomness is a pure function of (seed, epoch, index).

    Each sample is the dataset's ``joint_sample`` (what JDA needs, see the module's docstring;
    `in_loader` makes the views of images of differing sizes in the loader workers), or for a
    dataset without one its item. Batches then depend neither on torch's global RNG nor on
    workers or prefetching, so a run stopped mid-epoch resumes to the very same batches. The
    trainer calls `set_epoch` before each epoch.
    """

    def __init__(self, dataset: Dataset, seed: int, in_loader: Optional[Callable] = None):
        if in_loader is not None and getattr(_innermost(dataset, 0)[0], "decode", "cpu") == "accelerator":
            raise KdtoolError("data.decode: accelerator needs the JDA views made on the accelerator; here the loader "
                              "workers make them (augment.jda.device, or teacher.augment.jda.device for the teacher's "
                              "training, resolves to loader on this machine: set it to accelerator)")
        self.dataset, self.seed, self.epoch, self.in_loader = dataset, seed, 0, in_loader

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
            base, base_index = _innermost(self.dataset, index)
            if hasattr(base, "joint_sample"):
                return base.joint_sample(base_index, self.in_loader)
            return base[base_index]
        finally:
            generator.set_state(outside)


def unreadable_flags(dataset: Dataset) -> torch.Tensor | None:
    """The shared per-file flags of images skipped as unreadable, or None for a dataset that never skips."""
    while isinstance(dataset, (Subset, SeededSamples)):
        dataset = dataset.dataset
    return dataset.unreadable if isinstance(dataset, CheckedImageFolder) and dataset.bad_images == "skip" else None


def decode_fallback(dataset: Dataset) -> Optional[Callable[[int, np.ndarray], Optional[np.ndarray]]]:
    """What decodes, on this process, a file of `dataset` the accelerator could not (see
    :func:`decode_on_device`), or None for a dataset whose files never reach the accelerator."""
    while isinstance(dataset, (Subset, SeededSamples)):
        dataset = dataset.dataset
    return dataset.decode_fallback if isinstance(dataset, CheckedImageFolder) and dataset.decode == "accelerator" else None


def collate_samples(samples: list):
    """torch's default collate, except for images of differing sizes (``{"pixels"}`` and
    ``{"encoded"}`` samples): the decoded pixels packed one after the other, with "extent" (B, 2),
    "key" and "size"; where some images come as JPEG bytes, also those bytes packed ("encoded"),
    their lengths ("encoded_length"), rows in the batch ("encoded_row") and dataset indices
    ("encoded_index"), which :func:`decode_on_device` decodes into their place."""
    first = samples[0][0]
    if not (isinstance(first, dict) and ("pixels" in first or "encoded" in first)):
        return default_collate(samples)
    decoded = [np.asarray(sample["pixels"]) for sample, _ in samples if "pixels" in sample]
    encoded = [(row, sample) for row, (sample, _) in enumerate(samples) if "encoded" in sample]
    batch = {"pixels": torch.from_numpy(np.concatenate([image.reshape(-1) for image in decoded] or [np.zeros(0, np.uint8)])),
             "extent": torch.tensor([sample["extent"] if "encoded" in sample else sample["pixels"].shape[:2]
                                     for sample, _ in samples], dtype=torch.int64),
             "key": torch.tensor([sample["key"] for sample, _ in samples], dtype=torch.int64),
             "size": torch.tensor([sample["size"] for sample, _ in samples], dtype=torch.int64)}
    if encoded:
        batch.update({"encoded": torch.from_numpy(np.concatenate([sample["encoded"] for _, sample in encoded])),
                      "encoded_length": torch.tensor([len(sample["encoded"]) for _, sample in encoded], dtype=torch.int64),
                      "encoded_row": torch.tensor([row for row, _ in encoded], dtype=torch.int64),
                      "encoded_index": torch.tensor([sample["index"] for _, sample in encoded], dtype=torch.int64)})
    return batch, torch.tensor([label for _, label in samples], dtype=torch.int64)


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (CPU uint8 tensors) decoded to RGB uint8 (3, h, w) on `device`, in one batched
    call: nvJPEG on CUDA, libjpeg-turbo on the CPU. torchvision >= 0.19 takes a list and a
    device; deprecated since 0.29 in favour of TorchCodec (its warning silenced here). It
    returns no partial result: one bad file fails the call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _decode_each(encoded: list[torch.Tensor], extents: np.ndarray, device: torch.device,
                 decode: Callable) -> list[Optional[torch.Tensor]]:
    """Each JPEG decoded on `device` as HWC (None where it fails or its size is not its header's):
    the batch in one call, and only if that fails, one call per file."""
    try:
        images = decode(encoded, device)
    except (RuntimeError, ValueError):
        images = []
        for data in encoded:
            try:
                images.append(decode([data], device)[0])
            except (RuntimeError, ValueError):
                images.append(None)
    return [image.permute(1, 2, 0) if image is not None and tuple(image.shape[1:]) == tuple(hw) else None
            for image, hw in zip(images, extents)]


def decode_on_device(batch: dict, device: torch.device, fallback: Optional[Callable[[int, np.ndarray], Optional[np.ndarray]]],
                     decode: Callable = decode_jpegs) -> torch.Tensor:
    """A collated batch's images, all packed HWC one after the other on `device` in batch order:
    the JPEGs its "encoded" bytes hold decoded by `decode` (:func:`decode_jpegs`) into their
    rows. A file `decode` fails on goes to `fallback`(dataset index, bytes) (Pillow on this
    process, :meth:`CheckedImageFolder.decode_fallback`); where that gives None (unreadable,
    data.bad_images: skip) the image is replaced by grey 128 of its header's size, so that the
    batch keeps its rows, labels and keys (the file is counted as skipped)."""
    pixels = batch["pixels"].to(device, non_blocking=True)
    if "encoded" not in batch:
        return pixels
    hw = batch["extent"].cpu().numpy()
    rows, indices = batch["encoded_row"].cpu().tolist(), batch["encoded_index"].cpu().tolist()
    encoded = list(torch.split(batch["encoded"].cpu(), batch["encoded_length"].cpu().tolist()))
    decoded = _decode_each(encoded, hw[rows], device, decode)
    position = {row: k for k, row in enumerate(rows)}
    parts, offset = [], 0
    for row, (h, w) in enumerate(hw):
        if row not in position:
            parts.append(pixels[offset:offset + h * w * 3])
            offset += h * w * 3
            continue
        k = position[row]
        image = decoded[k]
        if image is None:
            if fallback is None:
                raise KdtoolError(f"training image {indices[k]}: the accelerator could not decode it (no CPU fallback given)")
            cpu = fallback(indices[k], encoded[k].numpy())
            grey = torch.full((h, w, 3), 128, dtype=torch.uint8, device=device)  # skipped: its rows, label and key kept
            image = torch.from_numpy(cpu).to(device) if cpu is not None else grey
        parts.append(image.reshape(-1))
    return torch.cat(parts)


def build_loader(dataset: Dataset, cfg: DataConfig, *, train: bool, batch_size: int | None = None) -> DataLoader:
    """A DataLoader with the recipe's worker and pinned-memory settings (shuffled, full batches for training).
    `collate_samples` stacks tensors and batches the dicts of training samples field by field."""
    return DataLoader(
        dataset,
        batch_size=batch_size or (cfg.batch_size if train else cfg.eval_batch_size),
        shuffle=train,
        drop_last=train,
        num_workers=cfg.workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        # Persistent workers would keep a copy of the training set from before its `set_epoch`.
        persistent_workers=cfg.workers > 0 and not train,
        collate_fn=collate_samples,
    )
