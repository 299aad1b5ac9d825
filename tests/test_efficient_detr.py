"""Efficient DETR: the dense prior initialises the sparse part (top-k boxes and features),
the ablation switches, and the dense loss."""
import pytest
import torch

from qdet.engine.criterion import SetCriterion
from qdet.models.registry import build_model

from conftest import TINY, random_images


def capture_decoder_inputs(model, images):
    seen = {}
    real = model.decoder.forward

    def spy(tgt, query_pos, ref, memory, *args, **kwargs):
        seen.update(tgt=tgt, query_pos=query_pos, ref=ref, memory=memory)
        return real(tgt, query_pos, ref, memory, *args, **kwargs)

    model.decoder.forward = spy
    out = model(images)
    return out, seen


@pytest.mark.parametrize("ref_init", ["box", "point"])
def test_top_k_dense_predictions_initialise_the_decoder(ref_init):
    torch.manual_seed(0)
    model = build_model("efficient", {**TINY["efficient"], "ref_init": ref_init}).eval()
    with torch.no_grad():  # varied class biases, so the top-k is not a tie
        model.class_embed.bias.copy_(torch.randn(5))
    out, seen = capture_decoder_inputs(model, random_images([(64, 80)]))
    dense = out["enc_outputs"]
    score = dense["pred_logits"][0].max(-1).values
    valid = dense["pred_boxes"][0, :, 0] < 1            # invalid positions carry box 1.0
    score[~valid] = -1e9
    top = score.topk(6).indices
    boxes = dense["pred_boxes"][0, top]
    expected_ref = boxes if ref_init == "box" else boxes[:, :2]
    torch.testing.assert_close(seen["ref"][0], expected_ref)
    torch.testing.assert_close(seen["tgt"][0], seen["memory"][0, top])
    assert not seen["tgt"].requires_grad and not seen["ref"].requires_grad


def test_detach_option_lets_the_sparse_loss_reach_the_encoder():
    torch.manual_seed(0)
    model = build_model("efficient", {**TINY["efficient"], "detach_query": False})
    _, seen = capture_decoder_inputs(model, random_images([(64, 80)]))
    assert seen["tgt"].requires_grad


def test_learned_init_ablation_ignores_the_dense_prior():
    model = build_model("efficient", {**TINY["efficient"], "ref_init": "learned",
                                      "query_init": "learned"}).eval()
    _, seen = capture_decoder_inputs(model, random_images([(64, 80)]))
    assert seen["ref"].shape[-1] == 2
    torch.testing.assert_close(seen["tgt"][0], model.query_embed.weight[:, 32:])


def test_dense_part_has_its_own_set_loss_with_real_classes():
    model = build_model("efficient", TINY["efficient"])
    out = model(random_images([(64, 80)]))
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[.5, .5, .3, .3]])}]
    losses = SetCriterion(5, model.config.loss, model.focal)(out, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    assert not model.config.loss.enc_class_agnostic
    with pytest.raises(ValueError, match="ref_init"):
        build_model("efficient", {**TINY["efficient"], "ref_init": "grid"})
