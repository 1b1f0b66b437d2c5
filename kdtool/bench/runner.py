"""What every runtime's runner shares: the options it is opened with, the interface bench drives, and the
check that a model's input and output shapes are the manifest's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kdtool.bundle import BundleMismatch


@dataclass(frozen=True)
class RunnerOptions:
    input_name: str
    output_name: str
    threads: int
    include_copies: bool
    cuda_graphs: bool
    input_shape: tuple[int, int, int] | None = None  # (3, H, W) the manifest says; checked when a runner opens
    num_classes: int | None = None


class Runner(Protocol):
    """An artefact opened on a runtime. `stage` prepares one input batch before timing, `run` is one timed,
    synchronous inference on a staged batch, `predict` returns float32 logits for accuracy; `ran_on` names
    what really executes it (the provider a session got, the plugin, the TensorRT version)."""

    max_batch: int | None
    ran_on: str

    def stage(self, batch: np.ndarray) -> object: ...

    def run(self, staged: object) -> object: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


def check_io_shapes(where, input_shape, output_shape, options: RunnerOptions) -> None:
    """BundleMismatch when a model's input (N, 3, H, W) or output (N, C) differs from the manifest's."""
    def fixed(dims):  # symbolic or dynamic dims (None, 'batch', -1) are not compared
        return [d if isinstance(d, int) and d > 0 else None for d in dims]

    expected_in = [None, *options.input_shape] if options.input_shape else None
    expected_out = [None, options.num_classes] if options.num_classes else None
    for what, shape, expected in (("input", input_shape, expected_in), ("output", output_shape, expected_out)):
        if expected is None:
            continue
        got = fixed(shape)
        if len(got) != len(expected) or any(g is not None and g != e for g, e in zip(got[1:], expected[1:])):
            raise BundleMismatch(f"{where}: {what} shape {list(shape)} differs from the manifest's "
                                 f"{['batch', *expected[1:]]}")
