"""SIGINT/SIGTERM at a chosen step: training saves first, and resuming ends exactly like an uninterrupted run."""
from __future__ import annotations

import signal
import threading

import pytest

from kdtool.checkpoint import read_state
from kdtool.errors import Interrupted
from runs import fit_micro, kd_loss, metrics, on_call, same_weights

# 9 batches per epoch, a step every 2 and at the epoch's end: mid-epoch, at an epoch's end, on a batch
# that is not a step boundary (the stop waits for the step), and in the last epoch.
STOPS = [(signal.SIGINT, 4), (signal.SIGTERM, 9), (signal.SIGTERM, 14), (signal.SIGINT, 24)]


def send_once(signum: int):
    """Signal the main thread once, as a terminal or scheduler would. Sent to the main thread alone: with
    os.kill the kernel may hand it to any thread, and in a full run (this process has by then run ONNX
    Runtime's and OpenVINO's worker threads for earlier tests) that crashed the process with SIGSEGV
    every time; not traced further."""
    sent = []

    def action(parts):
        if not sent:
            sent.append(signal.pthread_kill(threading.main_thread().ident, signum))
        return parts

    return action


def test_signal_saves_then_resume_is_exact(tmp_path, fault_trials):
    trials = fault_trials("signal_fit")
    reference = tmp_path / "reference"
    fit_micro(reference)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for signum, at_call in STOPS:
        with trials.trial():
            out = tmp_path / f"{signum.name}-{at_call}"
            with pytest.raises(Interrupted) as stopped:
                fit_micro(out, loss_fn=on_call(kd_loss(), at_call, send_once(signum)))
            message = str(stopped.value)
            assert stopped.value.exit_code == 128 + signum and signum.name in message and "--resume" in message
            assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
            state = read_state(out / "last")
            fit_micro(out, resume=True)
            where = (signum.name, at_call, state["epoch"], state.get("mid_epoch", {}).get("batches"))
            assert metrics(out) == metrics(reference), where
            assert same_weights(out / "last", reference / "last"), where
