"""DETR specifics: padding invariance of the transformer, options, torch.compile."""
import torch

from qdet.blocks.position_encoding import sine_position_embedding
from qdet.models.registry import build_model

from conftest import TINY, random_images


def run_transformer(model, feat, mask):
    pos = sine_position_embedding(mask, model.config.d_model // 2)
    hs = model.transformer(model.input_proj(feat), mask, model.query_embed.weight, pos)
    return model.class_embed(hs), model.bbox_embed(hs).sigmoid()


def test_transformer_ignores_padding():
    """Features padded with garbage under the mask give exactly the unpadded outputs: keys
    are masked and positions count valid cells only (the official mask semantics)."""
    model = build_model("detr", TINY["detr"]).eval()
    feat = torch.randn(1, 512, 3, 4)
    padded = torch.randn(1, 512, 5, 7) * 10
    padded[:, :, :3, :4] = feat
    mask = torch.ones(1, 5, 7, dtype=torch.bool)
    mask[:, :3, :4] = False
    with torch.no_grad():
        a = run_transformer(model, feat, torch.zeros(1, 3, 4, dtype=torch.bool))
        b = run_transformer(model, padded, mask)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_padding_changes_only_border_features():
    """The backbone's convolutions see the zero padding, as in the official code: an image
    alone and in a padded batch differ a little, never in shape or by much."""
    model = build_model("detr", TINY["detr"]).eval()
    img = random_images([(64, 64)])[0]
    alone = model([img])
    batch = model([img, torch.zeros(3, 128, 128)])
    assert alone["pred_boxes"].shape == batch["pred_boxes"][:1].shape
    assert (alone["pred_boxes"] - batch["pred_boxes"][:1]).abs().max() < 0.2


def test_skip_first_self_attention():
    model = build_model("detr", {**TINY["detr"], "skip_first_self_attn": True})
    assert model.transformer.decoder.layers[0].self_attn is None
    assert model.transformer.decoder.layers[1].self_attn is not None
    assert model(random_images([(64, 64)]))["pred_boxes"].shape == (1, 6, 4)


def test_pre_norm_has_encoder_norm():
    model = build_model("detr", {**TINY["detr"], "pre_norm": True})
    assert model.transformer.encoder.norm is not None
    assert torch.isfinite(model(random_images([(64, 64)]))["pred_logits"]).all()


def test_compiled_transformer_matches_eager():
    torch._dynamo.reset()
    model = build_model("detr", TINY["detr"]).eval()
    images = random_images([(64, 96), (96, 64)])
    with torch.no_grad():
        eager = model(images)
        # fullgraph=True fails on any graph break, so this also proves there is none
        model.transformer.compile(fullgraph=True, dynamic=False)
        compiled = model(images)
    torch.testing.assert_close(compiled["pred_logits"], eager["pred_logits"],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled["pred_boxes"], eager["pred_boxes"],
                               rtol=1e-4, atol=1e-5)
