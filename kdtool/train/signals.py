"""SIGINT/SIGTERM during training: stop at the next step boundary after saving, not in the middle of one."""
from __future__ import annotations

import contextlib
import signal
import threading

import torch
from accelerate import Accelerator

from kdtool.errors import Interrupted


class StopRequest:
    """SIGINT/SIGTERM seen during `fit`: the loop saves at the next step boundary, then stops."""

    def __init__(self):
        self.signum = 0

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was signalled; every process must call this at the same step."""
        if accelerator.num_processes > 1:
            seen = torch.tensor([self.signum], device=accelerator.device)
            self.signum = int(accelerator.gather(seen).max())
        return self.signum != 0


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a `StopRequest` for the block; a second SIGINT stops at once, unsaved.

    A repeated SIGTERM is ignored: under a scheduler every rank gets one from the scheduler and another
    from its launcher (torchrun forwards the one it gets), and the save must not be cut short by it."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield request
        return

    def handler(signum, _frame):
        if request.signum and signum == signal.SIGINT:
            raise Interrupted(f"stopped by a second {signal.Signals(signum).name} before saving; "
                              "--resume continues from the last checkpoint", signum)
        request.signum = signum

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interrupted(signum: int, label: str, where: str, step: int, saved: str) -> Interrupted:
    """The error a signalled `fit` stops with, once its checkpoint is saved."""
    return Interrupted(f"{label}: stopped by {signal.Signals(signum).name} {where} (step {step}); "
                       f"saved {saved}; --resume continues from there", signum)
