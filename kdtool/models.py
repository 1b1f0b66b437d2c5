"""Model registry: torchvision classifiers, CIFAR-style ResNets and (optional extra) timm models, built by name.

Names: a registry name (``resnet8``, ``resnet18``, ``mobilenet_v3_large`` ...) or ``timm:<name>`` for any
timm model (``timm:convnext_tiny``, ``timm:resnet50.a1_in1k``). Weights (``weights:`` in a recipe):

- null: random init;
- a pretrained name: a torchvision weights enum name (``IMAGENET1K_V2``, read from torch's hub cache);
  for timm ``pretrained`` (the name's tag, or timm's default) or a tag (``a1_in1k``), read from the
  Hugging Face cache; either is downloaded only where the machine is online;
- a local file: a kdtool checkpoint directory, a ``.safetensors`` file, or a ``.pt``/``.pth`` state dict
  read with ``torch.load(weights_only=True)`` (never unpickled as code).
"""
from __future__ import annotations

import contextlib
import logging
import pickle
import re
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

from kdtool.errors import KdtoolError, Registry, closest

TIMM_PREFIX = "timm:"
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")  # timm's architecture[.tag]
PRETRAINED = "pretrained"
CHECKPOINT_FILE = "model.safetensors"  # the tensors of a kdtool checkpoint directory


# ------------------------------------------------------------------ CIFAR-style ResNets
class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer ResNets of CIFAR papers (resnet8 ... resnet110; the x4 variants are 4x wider)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, channels = [], widths[0]
        for i, width in enumerate(widths[1:]):
            layers = [BasicBlock(channels if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(blocks)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def _cifar_resnet(depth: int, widths: tuple[int, int, int, int], num_classes: int) -> nn.Module:
    return CifarResNet(depth, widths, num_classes)


def _torchvision(name: str, num_classes: int) -> nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


_NARROW, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
MODELS: Registry[Callable[[int], nn.Module]] = Registry(
    "model",
    {
        **{f"resnet{d}": partial(_cifar_resnet, d, _NARROW) for d in (8, 14, 20, 32, 56, 110)},
        "resnet8x4": partial(_cifar_resnet, 8, _X4),
        "resnet32x4": partial(_cifar_resnet, 32, _X4),
        **{
            name: partial(_torchvision, name)
            for name in (
                "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_small",
                "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "regnet_y_400mf",
            )
        },
    },
)


def _is_registered(name: str) -> bool:
    return name in set(MODELS)  # `in MODELS` would raise: Registry's lookup error is not a KeyError


def _weights_enum(model_name: str, weights_name: str):
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        return None
    return getattr(enum, weights_name, None)


def torchvision_weights(name: str, weights: str | None):
    """The torchvision weights enum member `weights` names for registry model `name`, or None."""
    if weights is None or not _is_registered(name):
        return None
    return _weights_enum(name, weights)


# ------------------------------------------------------------------ weights files
def _weights_file(path: Path) -> Path:
    """The file to read for `path`: itself, or the tensors of a kdtool checkpoint directory."""
    if path.is_dir():
        if not (path / CHECKPOINT_FILE).is_file():
            raise KdtoolError(f"weights directory {path} holds no {CHECKPOINT_FILE} (a kdtool checkpoint directory has one)")
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise KdtoolError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise KdtoolError(f"weights {path} is not a regular file")
    if path.stat().st_size == 0:
        raise KdtoolError(f"weights file {path} is empty (0 bytes)")
    return path


def _refusal_detail(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what was refused (torch >= 2.6 wording)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    detail = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), "")
    return f": {_first_sentence(detail)}" if detail else ""


def _first_sentence(text: str) -> str:
    """The first sentence of an error's first line: the fact, without the library's advice after it."""
    return next(iter(text.splitlines()), "").split(". ")[0][:160]


def _load_tensors(path: Path):
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KdtoolError(f"weights file {path} is not a plain state dict of tensors; the weights-only loader "
                          f"refused it and ran nothing from it{_refusal_detail(exc)}") from None
    # A hostile or damaged file can make the zip, pickle or safetensors readers raise nearly anything.
    except Exception as exc:  # noqa: BLE001 - every reader error becomes one line naming the file
        raise KdtoolError(f"checkpoint {path} is unreadable or corrupt "
                          f"({_first_sentence(str(exc)) or type(exc).__name__})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a kdtool checkpoint dir, a .safetensors file or a .pt/.pth state dict; one line on anything else."""
    path = _weights_file(Path(path))
    state = _load_tensors(path)
    for wrapper in ("model", "state_dict"):  # torchvision reference / timm training checkpoints
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise KdtoolError(f"checkpoint {path} holds no state dict of tensors")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise KdtoolError(f"checkpoint {path} holds non-finite values (NaN or inf) in {bad}")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` strictly, naming the first mismatching keys on failure."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch at {k} ({tuple(state[k].shape)} vs model {tuple(expected[k].shape)}; {len(wrong)} in all)")
        if missing:
            parts.append(f"missing keys {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)})")
        raise KdtoolError(f"checkpoint {source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def _load_file(model: nn.Module, weights: str, name: str, new_head: bool) -> None:
    path = Path(weights).expanduser()
    if not path.exists():
        raise KdtoolError(f"checkpoint not found: {weights} (nor is it a pretrained weights name of {name})")
    state = read_state_dict(path)
    load_weights(model, _with_fresh_classifier(model, state) if new_head else state, str(path))


def _classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's classifier: timm's (its pretrained_cfg names it), else the last Linear
    layer (the classifier of every registry model)."""
    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = [named] if isinstance(named, str) else list(named or ())
    if not names or not all(isinstance(n, str) and n in dict(model.named_modules()) for n in names):
        names = [[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]]
    return [f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters()]


def _with_fresh_classifier(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the model's own freshly initialised classifier where the weights' classifier predicts
    another number of classes (a student starting from pretrained features, from the cache or a file)."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    keys = _classifier_keys(model)
    if all(k in state and state[k].shape[1:] == own[k].shape[1:] for k in keys) and any(
            state[k].shape != own[k].shape for k in keys):
        state.update({k: own[k] for k in keys})
    return state


# ------------------------------------------------------------------ torchvision and CIFAR nets
def _build_registered(name: str, num_classes: int, weights: str | None, new_head: bool) -> nn.Module:
    model = MODELS[name](num_classes)
    if weights is None:
        return model
    enum_weights = _weights_enum(name, weights)
    if enum_weights is None:
        _load_file(model, weights, name, new_head)
        return model
    categories = len(enum_weights.meta.get("categories", []))
    if categories != num_classes and not new_head:
        raise KdtoolError(f"weights {weights} of {name} predict {categories} classes, the dataset has {num_classes}")
    try:
        state = enum_weights.get_state_dict(progress=False)
    except OSError as exc:
        raise KdtoolError(f"weights {name}.{weights} are not in torch's hub cache and could not be downloaded ({exc})") from None
    load_weights(model, _with_fresh_classifier(model, state) if new_head else state, f"{name}.{weights}")
    return model


# ------------------------------------------------------------------ timm (optional extra)
def _timm():
    try:
        import timm  # needs timm >= 1.0 (split_model_name_tag, get_pretrained_cfg, list_pretrained)
    except ImportError:
        raise KdtoolError("timm models need the timm package: pip install 'kdtool[timm]'") from None
    return timm


def parse_timm_name(name: str) -> tuple[str, str]:
    """``timm:arch[.tag]`` -> (arch, tag); an unknown architecture gets 'did you mean'."""
    timm = _timm()
    from timm.models import is_model, split_model_name_tag

    if not _TIMM_NAME.fullmatch(name.removeprefix(TIMM_PREFIX)):
        raise KdtoolError(f"{name!r} is not a timm model name: use {TIMM_PREFIX}<architecture>[.<tag>] with letters, "
                          f"digits and '_' (e.g. {TIMM_PREFIX}resnet18.a1_in1k)")
    arch, tag = split_model_name_tag(name.removeprefix(TIMM_PREFIX))
    if not is_model(arch):
        raise KdtoolError(f"unknown timm model {arch!r}{closest(arch, timm.list_models())} (timm {timm.__version__})")
    if tag and not timm.list_pretrained(f"{arch}.{tag}"):
        raise KdtoolError(f"timm model {arch} has no pretrained tag {tag!r}"
                          f"{closest(f'{arch}.{tag}', timm.list_pretrained(f'{arch}.*'))}")
    return arch, tag


def timm_pretrained_tag(name: str, weights: str | None) -> str | None:
    """The pretrained tag that `weights` asks for on timm model `name` ('' = timm's default); None = no pretrained."""
    arch, name_tag = parse_timm_name(name)
    if weights is None:
        return None
    if weights == PRETRAINED:
        return name_tag
    if _timm().list_pretrained(f"{arch}.{weights}"):
        if name_tag and name_tag != weights:
            raise KdtoolError(f"weights {weights!r} conflict with the tag in the model name {name!r}")
        return weights
    return None


def timm_pretrained_cfg(name: str, tag: str):
    """timm's pretrained_cfg (mean, std, input_size, interpolation, num_classes, hf_hub_id) of `name` at `tag`."""
    from timm.models import get_pretrained_cfg

    arch, _ = parse_timm_name(name)
    cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise KdtoolError(f"timm model {arch} has no pretrained weights; use weights: null or a local file")
    return cfg


def _offline_hint(cfg) -> str:
    import huggingface_hub.constants as hub

    where = f"the Hugging Face cache {hub.HF_HUB_CACHE}" if cfg.hf_hub_id else "torch's hub cache"
    offline = "HF_HUB_OFFLINE is set" if hub.HF_HUB_OFFLINE else "the download failed (offline? set HF_HUB_OFFLINE=1 to skip retries)"
    fetch = f"`hf download {cfg.hf_hub_id}`" if cfg.hf_hub_id else f"fetch {cfg.url}"
    return (f"not in {where} and {offline}: on a machine that is online run {fetch} (or any kdtool command "
            f"once) and copy the cache here, or give a local .safetensors file as weights")


def _timm_size(arch: str, tag: str, image_size: int | None) -> dict:
    """img_size for models built for one input size (ViTs): timm resamples their position embeddings."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    return {"img_size": image_size} if image_size and cfg is not None and cfg.fixed_input_size else {}


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's per-retry warnings silenced: a failed download becomes kdtool's one line."""
    logger = logging.getLogger("huggingface_hub")  # the library's root logger (huggingface_hub.utils.logging)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build_timm(name: str, num_classes: int, weights: str | None, new_head: bool, image_size: int | None) -> nn.Module:
    timm = _timm()
    arch, name_tag = parse_timm_name(name)
    tag = timm_pretrained_tag(name, weights)
    if tag is None:
        model = timm.create_model(f"{arch}.{name_tag}" if name_tag else arch, pretrained=False, num_classes=num_classes,
                                  **_timm_size(arch, name_tag, image_size))
        if weights is not None:
            _load_file(model, weights, name, new_head)
        return model
    cfg = timm_pretrained_cfg(name, tag)
    label = f"{TIMM_PREFIX}{arch}.{cfg.tag}"
    if cfg.num_classes != num_classes and not new_head:
        raise KdtoolError(f"pretrained weights {label} predict {cfg.num_classes} classes, the dataset has {num_classes}")
    try:  # timm replaces the classifier itself when the class counts differ
        with _quiet_hub():
            return timm.create_model(f"{arch}.{cfg.tag}", pretrained=True, num_classes=num_classes,
                                     **_timm_size(arch, cfg.tag, image_size))
    except OSError:  # huggingface_hub's LocalEntryNotFoundError and OfflineModeIsEnabled, urllib's URLError
        raise KdtoolError(f"pretrained weights {label} are {_offline_hint(cfg)}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged cached file: safetensors/torch/timm errors
        raise KdtoolError(f"pretrained weights {label} could not be loaded "
                          f"({_first_sentence(str(exc)) or type(exc).__name__})") from None


def check_model_name(name: str) -> None:
    """Raise the one-line error `build_model` would give for an unknown model name, without building it."""
    if name.startswith(TIMM_PREFIX):
        parse_timm_name(name)
    elif not _is_registered(name):
        _unknown_registry_name(name)


def _unknown_registry_name(name: str) -> None:
    try:
        from timm.models import is_model
    except ImportError:
        is_model = None
    if is_model is not None and is_model(name.split(".")[0]):
        raise KdtoolError(f"unknown model {name!r}; timm has it: use {TIMM_PREFIX}{name}")
    MODELS[name]  # raises the registry's error naming the known models


def build_model(name: str, num_classes: int, weights: str | None = None, *, new_head: bool = False,
                image_size: int | None = None) -> nn.Module:
    """Build model `name` with `num_classes` outputs and optional weights (a pretrained name or a file).

    Pretrained weights for another number of classes are refused, unless `new_head` (a student that starts
    from pretrained features): then the classifier starts afresh. A local file must fit exactly.
    `image_size` (the data's) sizes timm models built for one input size (ViTs); others ignore it.
    """
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name, num_classes, weights, new_head, image_size)
    check_model_name(name)
    return _build_registered(name, num_classes, weights, new_head)
