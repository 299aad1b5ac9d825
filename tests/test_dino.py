"""DINO: an official-layout checkpoint (IDEA-Research/DINO key names, aliases, ``args``)
loads through ``qdet.load`` and gives what an independent rewrite of the official forward
(``dino_reference``) gives on the same state dict, 4-scale and 5-scale, in float64; detrex's
layout loads with the same weights' outputs; look forward twice and the detached decoder
input hold for the gradients; the label embedding is copied by class name in fine-tuning."""
import argparse

import pytest
import torch
from dino_reference import dino_forward

import qdet
from qdet.models.registry import build_model
from qdet.weights.checkpoint import save_checkpoint
from qdet.weights.finetune import transfer

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
OFFICIAL = dict(TINY["dino"], num_feature_levels=4)


def perturbed(cfg):
    torch.manual_seed(0)
    model = build_model("dino", cfg).eval()
    with torch.no_grad():   # the zero-initialized heads and offsets take part
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def official_layout(model) -> dict:
    """The state dict as the official code saves it: ``backbone.0.body``, the decoder's
    aliases of the shared heads, ``label_enc`` with its extra (unused) row."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.body."):
            k = "backbone.0.body." + k[len("backbone.body."):]
        if k == "dn_label.weight":
            out["label_enc.weight"] = torch.cat([v, torch.randn(1, v.shape[1])])
            continue
        out[k] = v
        if k.startswith(("class_embed.", "bbox_embed.")):
            out["transformer.decoder." + k] = v
    return out


ARGS = argparse.Namespace(nheads=4, num_select=300, dn_number=100, dn_box_noise_scale=1.0,
                          dn_label_noise_ratio=0.5, pe_temperatureH=20,
                          two_stage_type="standard", embed_init_tgt=True)


@pytest.mark.parametrize("levels", [4, 5])
def test_official_checkpoint_matches_an_independent_forward(levels, tmp_path):
    model = perturbed({**OFFICIAL, "num_feature_levels": levels})
    sd = official_layout(model)
    save_checkpoint(tmp_path / "checkpoint0011_4scale.pth",
                    {"model": sd, "args": ARGS, "epoch": 11, "optimizer": {}})
    loaded = qdet.load(tmp_path / "checkpoint0011_4scale.pth").double()
    cfg = loaded.config
    assert (cfg.num_feature_levels, cfg.num_queries, cfg.share_heads) == (levels, 6, True)
    assert (cfg.dn.queries, cfg.dn.box_noise, cfg.dn.label_noise) == (100, 1.0, 0.25)
    assert loaded.max_detections == 300 and loaded.class_names[1] == "person"
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        out = loaded(x)
    ref_logits, ref_boxes = dino_forward({k: v.double() for k, v in sd.items()}, x, heads=4,
                                         points=2, depth="resnet18")
    # float64 on both sides: rounding is 1e-16; the two formulations differ in op order
    torch.testing.assert_close(out["pred_logits"], ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["pred_boxes"], ref_boxes, rtol=1e-9, atol=1e-9)


def detrex_layout(model) -> dict:
    """The same weights named as detrex saves them (7 separate heads, the 7th the encoder
    proposals'; detectron2's ResNet names; neck.*; attentions/ffns/norms)."""
    import re

    out = {}
    d2 = [(r"backbone\.body\.conv1\.", "backbone.stem.conv1."),
          (r"backbone\.body\.bn1\.", "backbone.stem.conv1.norm.")]
    for k, v in model.state_dict().items():
        if k.startswith("backbone.body.layer"):
            k = re.sub(r"backbone\.body\.layer(\d)\.", lambda m: f"backbone.res{int(m.group(1)) + 1}.", k)
            k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
            k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        for a, b in d2:
            k = re.sub("^" + a, b, k)
        k = re.sub(r"^input_proj\.(\d)\.0\.", lambda m: f"neck.convs.{m.group(1)}.conv.", k)
        k = re.sub(r"^input_proj\.(\d)\.1\.", lambda m: f"neck.convs.{m.group(1)}.norm.", k)
        k = k.replace("transformer.level_embed", "transformer.level_embeds")
        k = k.replace("transformer.enc_out_class_embed", "class_embed.2").replace(
            "transformer.enc_out_bbox_embed", "bbox_embed.2")
        m = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)", k)
        if m:
            part, i, rest = m.groups()
            table = ({"self_attn.": "attentions.0.", "norm1.": "norms.0.", "norm2.": "norms.1."}
                     if part == "encoder" else
                     {"self_attn.": "attentions.0.attn.", "cross_attn.": "attentions.1.",
                      "norm2.": "norms.0.", "norm1.": "norms.1.", "norm3.": "norms.2."})
            table.update({"linear1.": "ffns.0.layers.0.0.", "linear2.": "ffns.0.layers.1."})
            for old, new in table.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            k = f"transformer.{part}.layers.{i}.{rest}"
        if k == "dn_label.weight":
            k = "label_enc.weight"
        out[k] = v
    return out


def test_detrex_checkpoint_loads_with_the_same_outputs(tmp_path):
    # detrex files carry no training arguments: the heads are detrex's 8 (not in the shapes)
    cfg = {**OFFICIAL, "share_heads": False, "pe_temperature": 10000.0, "pe_offset": -0.5,
           "num_feature_levels": 4, "nheads": 8}
    model = perturbed(cfg)
    save_checkpoint(tmp_path / "dino_r50_4scale_12ep.pth", {"model": detrex_layout(model)})
    loaded = qdet.load(tmp_path / "dino_r50_4scale_12ep.pth")
    assert not loaded.config.share_heads and loaded.config.pe_offset == -0.5
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


@pytest.mark.parametrize("twice", [True, False])
def test_look_forward_twice_and_a_detached_decoder_input(twice):
    """Layer 2's boxes train the refinement of layer 1 (its box is reported from layer 1's
    box, not detached), unless look forward twice is off; layer 2's classes never do (the
    box it samples at is detached)."""
    model = build_model("dino", {**OFFICIAL, "share_heads": False,
                                 "look_forward_twice": twice}).train()
    x = torch.randn(1, 3, 96, 128)
    for key, reaches in (("pred_boxes", twice), ("pred_logits", False)):
        model.zero_grad()
        model(x)[key].sum().backward()
        grad = model.bbox_embed[0].layers[-1].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches, key


def test_pure_query_selection_takes_the_selected_features_as_content():
    """With mixed selection off there is no learned content; the decoder's first layer
    receives the selected encoder features themselves (detached), as the official code
    does with embed_init_tgt=False."""
    model = build_model("dino", {**OFFICIAL, "mixed_selection": False}).eval()
    assert model.transformer.tgt_embed is None
    seen = {}
    layer = model.transformer.decoder.layers[0]
    def hook(module, args, kwargs):
        seen["tgt"] = args[0] if args else kwargs["tgt"]

    layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128))
    chosen = out["enc_outputs"]
    # the selected features are what the encoder heads scored: the same class logits
    torch.testing.assert_close(model.transformer.enc_out_class_embed(seen["tgt"]),
                               chosen["pred_logits"])


def test_fine_tuning_copies_the_label_embedding_by_name():
    source = build_model("dino", OFFICIAL)
    source.class_names = ["cat", "dog", "fish", "bird", "cow"]
    target = build_model("dino", {**OFFICIAL, "num_classes": 2})
    target.class_names = ["Dog", "horse"]
    report = transfer(source, target)
    assert report.copied == [["Dog", "dog"]] and report.new == ["horse"]
    torch.testing.assert_close(target.dn_label.weight[0], source.dn_label.weight[1])
    torch.testing.assert_close(target.transformer.enc_out_class_embed.weight[0],
                               source.transformer.enc_out_class_embed.weight[1])
