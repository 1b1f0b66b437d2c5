"""Model registry: torchvision classifiers and CIFAR-style ResNets, built by name.

Weights come from a torchvision weights enum name (e.g. ``IMAGENET1K_V2``, read from torch's hub
cache, downloaded only where the machine is online) or a local checkpoint: a kdtool checkpoint
directory, a ``.safetensors`` file, or a ``.pt``/``.pth`` state dict.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

from kdtool.errors import KdtoolError, Registry


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


def _weights_enum(model_name: str, weights_name: str):
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        return None
    return getattr(enum, weights_name, None)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a kdtool checkpoint dir, a .safetensors file or a .pt/.pth state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise KdtoolError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise KdtoolError(f"checkpoint {path} is unreadable or corrupt: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # torchvision reference checkpoints
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdtoolError(f"checkpoint {path} holds no state dict of tensors")
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


def build_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build a registered model with `num_classes` outputs and optional weights (enum name or path)."""
    model = MODELS[name](num_classes)
    if weights is None:
        return model
    enum_weights = _weights_enum(name, weights)
    if enum_weights is not None:
        categories = len(enum_weights.meta.get("categories", []))
        if categories != num_classes:
            raise KdtoolError(f"weights {weights} of {name} predict {categories} classes, the dataset has {num_classes}")
        try:
            state = enum_weights.get_state_dict(progress=False)
        except OSError as exc:
            raise KdtoolError(f"weights {name}.{weights} are not in torch's hub cache and could not be downloaded ({exc})") from None
        load_weights(model, state, f"{name}.{weights}")
        return model
    path = Path(weights).expanduser()
    if not path.exists():
        raise KdtoolError(f"checkpoint not found: {weights} (nor is it a torchvision weights name of {name})")
    load_weights(model, read_state_dict(path), str(path))
    return model
