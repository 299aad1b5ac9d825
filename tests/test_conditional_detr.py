"""Conditional DETR: parity with HF transformers' ConditionalDetrForObjectDetection (a
random-weight model written with ``save_pretrained``, either backbone flavour, loaded with
``qdet.load`` and compared with HF's own model read from the same folder)."""
import pytest
import torch
from hf_convert import assert_outputs_close, backbone_kwargs, randomize_, save_hf

import qdet
from qdet.blocks.base import batch_images
from qdet.models.registry import build_model

from conftest import TINY, random_images

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["hf-resnet", "timm"])
def hf_and_qdet(request, tmp_path_factory):
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    torch.manual_seed(0)
    cfg = ConditionalDetrConfig(**backbone_kwargs(request.param, ["stage4"]),
                                d_model=32, encoder_layers=2, decoder_layers=3,
                                encoder_attention_heads=4, decoder_attention_heads=4,
                                encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=7,
                                num_labels=6, dropout=0.0)
    # auxiliary_loss stays False: with it, HF (5.x) feeds layer-normed decoder states to the
    # next layer, unlike the official code; aux heads are compared from raw hidden states.
    folder = save_hf(randomize_(ConditionalDetrForObjectDetection(cfg).eval()),
                     tmp_path_factory.mktemp("hf") / "conditional-tiny")
    hf = ConditionalDetrForObjectDetection.from_pretrained(folder).eval()
    return hf, qdet.load(folder)


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
