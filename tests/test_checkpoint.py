"""Checkpoint safety and errors: weights_only loading, allow-list, clear messages."""
import argparse
import collections
import os

import pytest
import torch

import qdet
from qdet.weights.checkpoint import CheckpointError, read_checkpoint, save_checkpoint


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/qdet_pwned",))


class Custom:
    pass


def test_code_in_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Evil()}, path)
    if os.path.exists("/tmp/qdet_pwned"):
        os.unlink("/tmp/qdet_pwned")
    with pytest.raises(CheckpointError, match="refused to unpickle.*system"):
        qdet.load(path)
    assert not os.path.exists("/tmp/qdet_pwned")


def test_unknown_class_is_named(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"model": {}, "extra": Custom()}, path)
    with pytest.raises(CheckpointError, match="Custom"):
        read_checkpoint(path)


def test_namespace_and_plain_values_are_allowed(tmp_path):
    path = tmp_path / "ok.pth"
    obj = {"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-4, nheads=8),
           "epoch": 3, "od": collections.OrderedDict(a=1)}
    torch.save(obj, path)
    got = read_checkpoint(path)
    assert got["args"].nheads == 8 and got["epoch"] == 3


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        qdet.load(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        qdet.load(bad)


def test_unrecognized_state_dict(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="match no architecture"):
        qdet.load(path)


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})  # lambdas cannot pickle
    assert read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
