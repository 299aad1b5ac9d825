"""DETR parity with an independent implementation: HF transformers' DetrForObjectDetection.

A random-weight HF model is written with ``save_pretrained`` (either backbone flavour: HF's
ResNet or timm's) and the folder is loaded with ``qdet.load``; its outputs, final and per
decoder layer, equal those of HF's own model read from the same folder. The same weights in
the official facebookresearch/detr layout (``{'model': ..., 'args': Namespace}``, through
the package's HF -> official mapping) load to the same model, so the official-checkpoint
path is checked end to end too.
"""
import argparse

import pytest
import torch
from hf_convert import assert_outputs_close, backbone_kwargs, randomize_, save_hf

import qdet
from qdet.blocks.base import batch_images
from qdet.weights.hf_format import hf_to_official

from conftest import random_images

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["hf-resnet", "timm"])
def hf_and_qdet(request, tmp_path_factory):
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    cfg = DetrConfig(**backbone_kwargs(request.param, ["stage4"]), d_model=32,
                     encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     num_queries=7, num_labels=6, dropout=0.0,
                     id2label={i: f"thing {i}" for i in range(6)})
    # auxiliary_loss stays False: with it, HF (5.x) feeds each layer-normed decoder output
    # to the next layer, which the official code does not; aux heads are compared below
    # from HF's raw decoder hidden states instead.
    folder = save_hf(randomize_(DetrForObjectDetection(cfg).eval()),
                     tmp_path_factory.mktemp("hf") / "detr-tiny")
    hf = DetrForObjectDetection.from_pretrained(folder).eval()
    return hf, qdet.load(folder), folder


def test_config_and_labels_from_the_folder(hf_and_qdet):
    _, model, _ = hf_and_qdet
    c = model.config
    assert (c.backbone, c.d_model, c.nheads, c.enc_layers, c.dec_layers, c.num_queries,
            c.num_classes, c.dim_feedforward) == ("resnet18", 32, 4, 2, 3, 7, 6, 64)
    assert model.class_names == [f"thing {i}" for i in range(6)]
    assert not model.training


@pytest.mark.parametrize("sizes", [[(64, 96)], [(64, 96), (96, 64), (80, 80)]])
def test_outputs_match_hf(hf_and_qdet, sizes):
    hf, model, _ = hf_and_qdet
    images = random_images(sizes, seed=1)
    x, mask = batch_images(images)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=(~mask).long(), output_hidden_states=True)
        out = model(images)
        # every decoder layer's output through the final LayerNorm and the shared heads
        hs = [hf.model.decoder.layernorm(h) for h in ref.decoder_hidden_states[1:-1]]
        ref_aux = [(hf.class_labels_classifier(h), hf.bbox_predictor(h).sigmoid()) for h in hs]
    assert len(ref_aux) == 2
    assert_outputs_close(out, ref.logits, ref.pred_boxes, ref_aux)


def test_official_layout_of_the_same_weights(hf_and_qdet, tmp_path):
    hf, model, _ = hf_and_qdet
    path = tmp_path / "detr-tiny.pth"
    args = argparse.Namespace(nheads=4, dilation=False, backbone="resnet18", lr=1e-4)
    torch.save({"model": hf_to_official(hf.state_dict(), "detr"), "args": args, "epoch": 3,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    official = qdet.load(path)
    images = random_images([(64, 96)], seed=3)
    with torch.no_grad():
        a, b = official(images), model(images)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
