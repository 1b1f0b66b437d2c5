"""Bad weights files (issue 9): one line naming the file, exit 2, never a traceback, never code run from the file.

Each case is a file a user (or an attacker) could name as `teacher.weights` / `student.weights`: empty,
truncated, random bytes, a pickle whose `__reduce__` would create a marker file (in a torch zip, raw, and
under a .safetensors name), a dict of non-tensors, NaN weights, a FIFO, a directory without a checkpoint,
weights of another class count or architecture.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import one_line_error
from kdtool.errors import KdtoolError
from kdtool.models import build_model
from runs import MICRO, QUICKSTART, set_args


class _Payload:
    """Unpickling this calls open(marker, 'w'): any loader that runs code from the file leaves the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _good_state() -> dict:
    return build_model("resnet8", 10).state_dict()


def _write_case(case: str, directory, marker):
    """Create the bad weights named by `case` in `directory`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    good_st, good_pt = directory / "good.safetensors", directory / "good.pt"
    save_file(_good_state(), str(good_st))
    torch.save(_good_state(), good_pt)
    writers = {
        "empty.pt": lambda p: p.write_bytes(b""),
        "empty.safetensors": lambda p: p.write_bytes(b""),
        "truncated.pt": lambda p: p.write_bytes(good_pt.read_bytes()[: good_pt.stat().st_size // 2]),
        "truncated.safetensors": lambda p: p.write_bytes(good_st.read_bytes()[:100]),
        "random.pth": lambda p: p.write_bytes(os.urandom(4096)),
        "random.safetensors": lambda p: p.write_bytes(os.urandom(4096)),
        "code_in_zip.pt": lambda p: torch.save({"conv.weight": _Payload(marker)}, p),
        "code_raw_pickle.pth": lambda p: p.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2)),
        "code_named.safetensors": lambda p: p.write_bytes(pickle.dumps(_Payload(marker), protocol=2)),
        "not_tensors.pt": lambda p: torch.save({"epoch": 3, "lr": 0.1}, p),
        "nan.safetensors": lambda p: save_file({k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                                                for k, v in _good_state().items()}, str(p)),
        "fifo.pt": lambda p: os.mkfifo(p),
        "no_checkpoint_dir": lambda p: (p.mkdir(), (p / "notes.txt").write_text("not weights")),
    }
    path = directory / case
    writers[case](path)
    return path


CASES = ["empty.pt", "empty.safetensors", "truncated.pt", "truncated.safetensors", "random.pth",
         "random.safetensors", "code_in_zip.pt", "code_raw_pickle.pth", "code_named.safetensors", "not_tensors.pt",
         "nan.safetensors", "fifo.pt", "no_checkpoint_dir"]


def test_the_payload_is_live(tmp_path):
    """The planted pickle does run code under a plain unpickler, so the marker checks below can fail."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["resnet8", "timm:test_resnet"])
def test_bad_weights_file_is_one_line_naming_it(case, name, tmp_path):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    marker = tmp_path / "code-ran"
    path = _write_case(case, tmp_path / "files", marker)
    with pytest.raises(KdtoolError) as error:
        build_model(name, 10, str(path))
    message = str(error.value)
    assert str(path) in message and "\n" not in message and error.value.exit_code == 2, message
    assert not marker.exists()


@pytest.mark.parametrize("case", ["code_in_zip.pt", "code_raw_pickle.pth", "truncated.safetensors", "no_checkpoint_dir"])
def test_bad_teacher_weights_through_the_cli(case, tmp_path, cli_runner):
    marker = tmp_path / "code-ran"
    path = _write_case(case, tmp_path / "files", marker)
    line = one_line_error(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", f"teacher.weights={path}",
                                     "--out", tmp_path / "run"))
    assert str(path) in line, line
    assert not marker.exists()


def test_weights_of_another_class_count_or_architecture(tmp_path, cli_runner):
    five = tmp_path / "five_classes.safetensors"
    save_file(build_model("resnet8", 5).state_dict(), str(five))
    line = one_line_error(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", f"teacher.weights={five}",
                                     "--out", tmp_path / "a"))
    assert str(five) in line and "shape mismatch at fc.weight" in line, line
    other = tmp_path / "resnet14.pt"
    torch.save(build_model("resnet14", 10).state_dict(), other)
    line = one_line_error(cli_runner("distill", QUICKSTART, *set_args(MICRO), "--set", f"student.weights={other}",
                                     "--out", tmp_path / "b"))
    assert str(other) in line and "does not fit the model" in line, line
