"""Every registered architecture: output contract, padding, gradients, config round trip."""
import pytest
import torch

import qdet
from qdet.blocks.base import batch_images
from qdet.models.registry import ARCHS, build_model
from qdet.weights.checkpoint import model_checkpoint
from qdet.weights.loading import model_from_checkpoint

from conftest import TINY, random_images


def test_every_arch_has_a_tiny_config():
    assert set(TINY) == set(ARCHS)


@pytest.fixture(params=list(ARCHS))
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, TINY[request.param]).eval()


def test_output_contract(model):
    out = model(random_images([(64, 80), (48, 64)]))
    c, q = model.config.num_classes, model.config.num_queries
    assert out["pred_logits"].shape == (2, q, c if model.focal else c + 1)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert torch.isfinite(out["pred_boxes"]).all() and (out["pred_boxes"][..., 2:] > 0).all()
    for aux in out.get("aux_outputs", []):
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_boxes"].shape == out["pred_boxes"].shape


def test_tensor_and_list_inputs_agree(model):
    images = random_images([(64, 64), (64, 64)])
    a, b = model(torch.stack(images)), model(images)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


def test_batch_elements_are_independent(model):
    """An image in a padded batch gives the outputs it gives alone, padded to the same
    size: the mask keeps padding and other images out (nothing leaks across the batch)."""
    images = random_images([(64, 96), (96, 64)])
    batch = model(images)
    x, _ = batch_images(images)
    for i, im in enumerate(images):
        padded = torch.zeros_like(x[0])
        padded[:, :im.shape[1], :im.shape[2]] = im
        alone = model([padded[:, :im.shape[1], :im.shape[2]], torch.zeros(3, 96, 96)])
        torch.testing.assert_close(batch["pred_logits"][i], alone["pred_logits"][0],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch["pred_boxes"][i], alone["pred_boxes"][0],
                                   rtol=1e-4, atol=1e-5)


def test_backward_reaches_trainable_parameters(model):
    from qdet.engine.criterion import SetCriterion

    model.train()
    side = 64
    if hasattr(model, "init_proposal_boxes"):  # proposals of all sizes reach all FPN levels
        side = 480
        with torch.no_grad():
            n = len(model.init_proposal_boxes.weight)
            sizes = torch.tensor([0.1, 0.3, 0.6, 1.0]).repeat(4)[:n]
            model.init_proposal_boxes.weight[:, 2:] = sizes[:, None]
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[.3, .3, .2, .2],
                                                                       [.6, .6, .3, .4]])}]
    crit = SetCriterion(model.config.num_classes, model.config.loss, model.focal)
    # with the targets: the denoising queries (DINO's by default) take part too
    out = model(random_images([(side, side)]), targets)
    crit.weighted(crit(out, targets)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_checkpoint_round_trip(model, tmp_path):
    from qdet.weights.checkpoint import save_checkpoint

    model.class_names = [f"c{i}" for i in range(model.config.num_classes)]
    model.category_ids = [10 + i for i in range(model.config.num_classes)]
    save_checkpoint(tmp_path / "m.pt", model_checkpoint(model, epoch=1))
    loaded = qdet.load(tmp_path / "m.pt")
    assert loaded.config == model.config and loaded.arch == model.arch
    assert loaded.class_names == model.class_names and loaded.category_ids == model.category_ids
    images = random_images([(64, 64)])
    torch.testing.assert_close(loaded(images)["pred_boxes"], model(images)["pred_boxes"])
    again = model_from_checkpoint(model_checkpoint(loaded))
    assert again.config == model.config
