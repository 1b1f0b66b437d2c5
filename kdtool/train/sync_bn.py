"""BatchNorm over the global batch when several processes train (`runtime.sync_batchnorm`).

With per-rank BatchNorm each process normalises by the statistics of its own share of the batch,
so a run on N processes is not a run on one. torch's `nn.SyncBatchNorm` fixes that on GPUs only:
torch 2.14 refuses CPU input in its forward ("SyncBatchNorm expected input tensor to be on GPU or
XPU ...") and DDP refuses SyncBatchNorm layers in CPU modules. So on CUDA kdtool uses torch's, and
elsewhere `GlobalBatchNorm`: each rank's per-channel sums are all-reduced (any backend, gloo on the
CPU) and every rank normalises by the global mean and variance; the all-reduce's backward
all-reduces the gradients of those sums, so with DDP's averaging the gradients are the one-process
gradients of the whole batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: the backward sums the gradients of every rank."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm(_BatchNorm):
    """A BatchNorm layer (same parameters and buffers) whose training statistics cover every rank's batch."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        channels, dims = input.shape[1], [0, *range(2, input.dim())]
        # Sums in float64, so that the global variance E[x^2] - E[x]^2 loses nothing to cancellation.
        local = torch.cat([input.sum(dims, dtype=torch.float64), input.square().sum(dims, dtype=torch.float64),
                           input.new_tensor([input.numel() // channels], dtype=torch.float64)])
        total = _SumOverRanks.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean.square()
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype)
        out = (input - mean.to(input.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As `_BatchNorm.forward` does: an exponential (or, with momentum None, cumulative) average."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm layer computing its statistics over all ranks (torch's SyncBatchNorm on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    """Replace BatchNorm layers by GlobalBatchNorm ones holding the same parameter and buffer tensors."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(converted, name, tensor)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
