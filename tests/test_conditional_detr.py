"""Conditional DETR: parity with HF transformers' ConditionalDetrForObjectDetection (same
random weights, renamed into the official checkpoint layout, loaded with ``qdet.load``)."""
import argparse
import re

import pytest
import torch

import qdet
from qdet.base import batch_images
from qdet.registry import build_model

from conftest import TINY, random_images
from hf_convert import (DECODER_NAMES, ENCODER_NAMES, assert_outputs_close, detr_top_key,
                        hf_resnet_config, mha_keys, randomize_, rename_start, to_official)

transformers = pytest.importorskip("transformers")

SA = {"q_content_proj": "sa_qcontent_proj", "q_pos_proj": "sa_qpos_proj",
      "k_content_proj": "sa_kcontent_proj", "k_pos_proj": "sa_kpos_proj", "v_proj": "sa_v_proj",
      "o_proj": "self_attn.out_proj"}
CA = {"q_content_proj": "ca_qcontent_proj", "q_pos_proj": "ca_qpos_proj",
      "k_content_proj": "ca_kcontent_proj", "k_pos_proj": "ca_kpos_proj", "v_proj": "ca_v_proj",
      "q_pos_sine_proj": "ca_qpos_sine_proj", "o_proj": "cross_attn.out_proj"}


def hf_to_official(sd: dict) -> dict:
    def layer(sd, hf_prefix, part, rest, v):
        if part == "encoder":
            am = re.match(r"self_attn\.(q|k|v|o)_proj\.(weight|bias)", rest)
            if am:
                return mha_keys(sd, hf_prefix + "self_attn", *am.groups(), v, "self_attn")
            return {rename_start(rest, ENCODER_NAMES): v}
        am = re.match(r"(self_attn|encoder_attn)\.(\w+)\.(weight|bias)", rest)
        if am:
            attn, proj, kind = am.groups()
            return {(SA if attn == "self_attn" else CA)[proj] + "." + kind: v}
        return {rename_start(rest, DECODER_NAMES): v}

    return to_official(sd, layer, detr_top_key)


@pytest.fixture(scope="module")
def hf_and_qdet(tmp_path_factory):
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    torch.manual_seed(0)
    cfg = ConditionalDetrConfig(use_timm_backbone=False,
                                backbone_config=hf_resnet_config(["stage4"]),
                                d_model=32, encoder_layers=2, decoder_layers=3,
                                encoder_attention_heads=4, decoder_attention_heads=4,
                                encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=7,
                                num_labels=6, dropout=0.0)
    # auxiliary_loss stays False: with it, HF (5.x) feeds layer-normed decoder states to the
    # next layer, unlike the official code; aux heads are compared from raw hidden states.
    hf = randomize_(ConditionalDetrForObjectDetection(cfg).eval())
    path = tmp_path_factory.mktemp("official") / "conditional-tiny.pth"
    torch.save({"model": hf_to_official(hf.state_dict()), "args": argparse.Namespace(nheads=4),
                "epoch": 49}, path)
    return hf, qdet.load(path)


def test_config_inferred(hf_and_qdet):
    m = hf_and_qdet[1]
    c = m.config
    assert (c.d_model, c.nheads, c.enc_layers, c.dec_layers, c.num_queries, c.num_classes,
            c.dim_feedforward, m.focal) == (32, 4, 2, 3, 7, 6, 64, True)


@pytest.mark.parametrize("sizes", [[(64, 96)], [(64, 96), (96, 64), (80, 80)]])
def test_outputs_match_hf(hf_and_qdet, sizes):
    hf, model = hf_and_qdet
    images = random_images(sizes, seed=2)
    x, mask = batch_images(images)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=(~mask).long(), output_hidden_states=True)
        out = model(images)
        refpts = hf.model(pixel_values=x, pixel_mask=(~mask).long()).reference_points
        refpts = refpts.transpose(0, 1)  # HF returns [Q, B, 2]
        logit = torch.log(refpts / (1 - refpts))
        ref_aux = []
        for h in ref.decoder_hidden_states[1:-1]:
            h = hf.model.decoder.layernorm(h)
            delta = hf.bbox_predictor(h)
            delta = torch.cat([delta[..., :2] + logit, delta[..., 2:]], -1)
            ref_aux.append((hf.class_labels_classifier(h), delta.sigmoid()))
    assert len(ref_aux) == 2
    assert_outputs_close(out, ref.logits, ref.pred_boxes, ref_aux)


def test_only_first_layer_adds_query_position_to_content():
    model = build_model("conditional", TINY["conditional"])
    layers = model.transformer.decoder.layers
    assert layers[0].ca_qpos_proj is not None and layers[1].ca_qpos_proj is None
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in model.state_dict()
