"""DETR parity with an independent implementation: HF transformers' DetrForObjectDetection.

The HF model's random weights are renamed into the official facebookresearch/detr
checkpoint layout (``{'model': ..., 'args': Namespace}``), saved, and loaded with
``qdet.load`` -- so this also checks the official-checkpoint path end to end.
"""
import argparse
import re

import pytest
import torch

import qdet
from hf_convert import (DECODER_NAMES, ENCODER_NAMES, assert_outputs_close, detr_top_key,
                        hf_resnet_config, mha_keys, randomize_, rename_start, to_official)

transformers = pytest.importorskip("transformers")

ATTN = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}


def hf_to_official(sd: dict) -> dict:
    """HF DETR state dict -> facebookresearch/detr names (the inverse of HF's converter)."""
    def layer(sd, hf_prefix, part, rest, v):
        am = re.match(r"(self_attn|encoder_attn)\.(q|k|v|o)_proj\.(weight|bias)", rest)
        if am:
            attn, which, kind = am.groups()
            return mha_keys(sd, hf_prefix + attn, which, kind, v, ATTN[attn])
        return {rename_start(rest, ENCODER_NAMES if part == "encoder" else DECODER_NAMES): v}

    return to_official(sd, layer, detr_top_key)


@pytest.fixture(scope="module")
def hf_and_qdet(tmp_path_factory):
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=hf_resnet_config(["stage4"]),
                     d_model=32,
                     encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     num_queries=7, num_labels=6, dropout=0.0)
    # auxiliary_loss stays False: with it, HF (5.x) feeds each layer-normed decoder output
    # to the next layer, which the official code does not; aux heads are compared below
    # from HF's raw decoder hidden states instead.
    hf = randomize_(DetrForObjectDetection(cfg).eval())
    path = tmp_path_factory.mktemp("official") / "detr-tiny.pth"
    args = argparse.Namespace(nheads=4, dilation=False, backbone="resnet18", lr=1e-4)
    torch.save({"model": hf_to_official(hf.state_dict()), "args": args, "epoch": 3,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return hf, qdet.load(path), path


def test_config_inferred_from_checkpoint(hf_and_qdet):
    _, model, _ = hf_and_qdet
    c = model.config
    assert (c.backbone, c.d_model, c.nheads, c.enc_layers, c.dec_layers, c.num_queries,
            c.num_classes, c.dim_feedforward) == ("resnet18", 32, 4, 2, 3, 7, 6, 64)
    assert not model.training


@pytest.mark.parametrize("sizes", [[(64, 96)], [(64, 96), (96, 64), (80, 80)]])
def test_outputs_match_hf(hf_and_qdet, sizes):
    hf, model, _ = hf_and_qdet
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    from qdet.base import batch_images

    x, mask = batch_images(images)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=(~mask).long(), output_hidden_states=True)
        out = model(images)
        # every decoder layer's output through the final LayerNorm and the shared heads
        hs = [hf.model.decoder.layernorm(h) for h in ref.decoder_hidden_states[1:-1]]
        ref_aux = [(hf.class_labels_classifier(h), hf.bbox_predictor(h).sigmoid()) for h in hs]
    assert len(ref_aux) == 2
    assert_outputs_close(out, ref.logits, ref.pred_boxes, ref_aux)
