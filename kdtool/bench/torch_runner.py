"""The float student in PyTorch eager mode: the peer row of the report, on the CPU or a CUDA GPU."""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch

from kdtool.bench.loading import Artefact
from kdtool.bench.runner import Runner, RunnerOptions


class TorchRunner:
    """The float student in eager mode (the peer row of the report)."""

    max_batch = None

    def __init__(self, model: torch.nn.Module, device: torch.device, include_copies: bool):
        self.device, self.include_copies = device, include_copies
        self.ran_on = f"torch {torch.__version__} on {device.type}"
        self.on_gpu = device.type == "cuda"
        self.model = (copy.deepcopy(model).to(device) if self.on_gpu else model).eval()

    def stage(self, batch: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(batch))
        if not self.on_gpu:
            return host
        return host.pin_memory() if self.include_copies else host.to(self.device)

    @torch.inference_mode()
    def run(self, staged: torch.Tensor) -> object:
        logits = self.model(staged.to(self.device, non_blocking=True))
        if self.on_gpu:
            if self.include_copies:
                return logits.cpu()  # a blocking device-to-host copy: synchronises
            torch.cuda.synchronize(self.device)
        return logits

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)).float().cpu().numpy()


def open_torch(device: str) -> Callable[[Artefact, RunnerOptions], Runner]:
    def open_runner(artefact: Artefact, options: RunnerOptions) -> Runner:
        return TorchRunner(artefact.model, torch.device(device), options.include_copies)
    return open_runner
