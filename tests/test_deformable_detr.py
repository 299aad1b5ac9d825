"""Deformable DETR: parity with HF transformers' DeformableDetrForObjectDetection (a
random-weight model written with ``save_pretrained``, either backbone flavour, loaded with
``qdet.load`` and compared with HF's own model read from the same folder) for the plain,
box-refinement and two-stage variants; and the variants' structure."""
import pytest
import torch
from hf_convert import assert_outputs_close, backbone_kwargs, randomize_, save_hf

import qdet
from qdet.blocks.base import batch_images
from qdet.models.registry import build_model

from conftest import TINY, random_images

transformers = pytest.importorskip("transformers")


def hf_model(flavour="hf-resnet", **variant):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    torch.manual_seed(0)
    cfg = DeformableDetrConfig(
        **backbone_kwargs(flavour, ["stage2", "stage3", "stage4"]),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_feature_levels=4,
        encoder_n_points=2, decoder_n_points=2, num_queries=10, two_stage_num_proposals=10,
        num_labels=5, auxiliary_loss=True, dropout=0.0, **variant)
    model = randomize_(DeformableDetrForObjectDetection(cfg).eval())
    with torch.no_grad():  # a varied level embedding and sampling pattern
        for name, t in model.state_dict().items():
            if "level_embed" in name or "sampling_offsets.weight" in name:
                t.copy_(torch.randn_like(t) * 0.1)
    return model


VARIANTS = {"plain": {}, "box_refine": {"with_box_refine": True},
            "two_stage": {"with_box_refine": True, "two_stage": True}}


@pytest.mark.parametrize("flavour", ["hf-resnet", "timm"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_outputs_match_hf(name, flavour, tmp_path):
    from transformers import DeformableDetrForObjectDetection

    folder = save_hf(hf_model(flavour, **VARIANTS[name]), tmp_path / f"deformable-{name}")
    hf = DeformableDetrForObjectDetection.from_pretrained(folder).eval()
    model = qdet.load(folder)
    cfg = model.config
    assert (cfg.with_box_refine, cfg.two_stage) == (name != "plain", name == "two_stage")
    assert (cfg.d_model, cfg.num_feature_levels, cfg.enc_n_points, cfg.num_classes) == (32, 4, 2, 5)
    images = random_images([(96, 128), (80, 112)])
    x, mask = batch_images(images)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=(~mask).long())
        out = model(images)
    # layer 0 (the aux output): HF's own heads on HF's hidden state and reference
    h0 = ref.intermediate_hidden_states[:, 0]
    with torch.no_grad():
        logits0 = hf.class_embed[0](h0)
        delta0 = hf.bbox_embed[0](h0)
    init = ref.init_reference_points
    logit_ref = torch.log(init / (1 - init))
    if init.shape[-1] == 2:
        delta0 = torch.cat([delta0[..., :2] + logit_ref, delta0[..., 2:]], -1)
    else:
        delta0 = delta0 + logit_ref
    assert_outputs_close(out, ref.logits, ref.pred_boxes, [(logits0, delta0.sigmoid())])
    if name == "two_stage":
        torch.testing.assert_close(out["enc_outputs"]["pred_logits"], ref.enc_outputs_class,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["enc_outputs"]["pred_boxes"],
                                   ref.enc_outputs_coord_logits.sigmoid(), rtol=1e-4, atol=1e-5)


def test_heads_per_variant():
    plain = build_model("deformable", TINY["deformable"])
    assert plain.class_embed[0] is plain.class_embed[1]          # one shared head
    refine = build_model("deformable", {**TINY["deformable"], "with_box_refine": True})
    assert refine.class_embed[0] is not refine.class_embed[1]    # one head per layer
    two = build_model("deformable", {**TINY["deformable"], "with_box_refine": True,
                                     "two_stage": True})
    assert len(two.class_embed) == 3 and not hasattr(two, "query_embed")
    assert two.focal
    with pytest.raises(ValueError, match="two_stage needs with_box_refine"):
        build_model("deformable", {**TINY["deformable"], "two_stage": True})


def test_single_scale_and_two_levels():
    for levels, stages in ((1, (4,)), (2, (3, 4)), (3, (2, 3, 4)), (4, (2, 3, 4))):
        m = build_model("deformable", {**TINY["deformable"], "num_feature_levels": levels}).eval()
        assert m.backbone.layers == stages and len(m.input_proj) == levels
        assert m(random_images([(128, 128)]))["pred_boxes"].shape == (1, 6, 4)


def test_deformable_layers_compile_without_graph_breaks():
    torch._dynamo.reset()
    model = build_model("deformable", TINY["deformable"]).eval()
    images = random_images([(64, 96), (96, 64)])
    with torch.no_grad():
        srcs, masks, pos = model.features(images)
        eager = model.transformer(srcs, masks, pos, model.query_embed.weight, model.class_embed,
                                  model.bbox_embed)
        compiled_fn = torch.compile(model.transformer, fullgraph=True, backend="aot_eager")
        compiled = compiled_fn(srcs, masks, pos, model.query_embed.weight, model.class_embed,
                               model.bbox_embed)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
