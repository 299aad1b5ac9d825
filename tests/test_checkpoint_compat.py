"""Checkpoints written before the package moved into subpackages still load, with identical
outputs.

``tests/data/qdet1_checkpoints.json`` was written by the qdet of commit fd3798f (the flat
layout) for every method's tiny config with seed 0: the checkpoint's metadata (format, arch,
config, labels, preprocessing, epoch), every state-dict key with its shape, dtype and
checksums, and the model's outputs on a fixed input, computed in float64 so that they are
the same on any CPU (the flat layout's Anchor DETR needed a float64 twin of one function
for that, ``axis_positions``, which counts cells in the model's dtype now). A checkpoint stores arch names, never module
paths, so the file a user has is this metadata plus the weights: the test rebuilds the
weights from the same seed, checks that they are the old ones key by key, writes the
checkpoint file, and loads it with ``qdet.load``."""
import json
from pathlib import Path

import pytest
import torch

import qdet
from qdet.models.registry import build_model
from qdet.weights.checkpoint import save_checkpoint

from conftest import TINY

REFERENCE = json.loads((Path(__file__).parent / "data" / "qdet1_checkpoints.json").read_text())


@pytest.mark.parametrize("arch", list(REFERENCE))
def test_a_checkpoint_of_the_flat_layout_loads_with_identical_outputs(arch, tmp_path):
    ref = REFERENCE[arch]
    assert ref["meta"]["config"] == {**ref["meta"]["config"], **TINY[arch]}
    torch.manual_seed(0)
    state = build_model(arch, TINY[arch]).state_dict()
    assert list(state) == list(ref["state"]), "state-dict keys changed"
    for key, info in ref["state"].items():
        t = state[key]
        assert [list(t.shape), str(t.dtype).replace("torch.", "")] == [info["shape"],
                                                                     info["dtype"]], key
        # float64 sums of the same float32 values: equal up to summation order
        assert float(t.double().sum()) == pytest.approx(info["sum"], rel=1e-9, abs=1e-9), key
        assert float(t.double().abs().sum()) == pytest.approx(info["abs"], rel=1e-9), key
    save_checkpoint(tmp_path / "old.pt", {**ref["meta"], "model": state})
    model = qdet.load(tmp_path / "old.pt")
    assert model.class_names == ref["meta"]["class_names"]
    assert model.category_ids == ref["meta"]["category_ids"]
    assert model.preprocess == ref["meta"]["preprocess"]
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.double()(x.double())
    # float64 rounding (1e-16) amplified even 1000-fold by a random model stays far below
    # 1e-9; a changed computation is far above it. The deformable encoder's reference points
    # of a float64 model were float32 in that layout's release (rounding 6e-8) and are
    # float64 now, which moved its outputs by up to 2e-8 relative.
    rtol = 1e-7 if arch in ("deformable", "efficient") else 1e-9
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], torch.tensor(ref["outputs"][key], dtype=torch.float64),
                                   rtol=rtol, atol=rtol * 1e-3)
