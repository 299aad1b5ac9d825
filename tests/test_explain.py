"""qdet explain: capturing changes nothing; the decomposed terms sum to the logits the layer
used and their softmax with the real padding mask is the layer's own attention; sampling
points and weights are what the deformable-attention op received; stage boxes are the
model's; on every method, on the fast path, from the CLI."""
import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, roi_align

import qdet
from qdet.blocks.fast import optimize_for_inference
from qdet.models.registry import build_model
from qdet.ops import deform_attn
from qdet.tools.explain import explain
from qdet.tools.explain_capture import (
    capture,
    conditional_terms,
    masked_softmax,
    mha_terms,
    rcda_attention,
)

from conftest import TINY, random_images

VARIANTS = {
    **{a: TINY[a] for a in TINY},
    "detr-prenorm": {**TINY["detr"], "pre_norm": True},
    "anchor-standard": {**TINY["anchor"], "attention": "standard"},
    "deformable-refine": {**TINY["deformable"], "with_box_refine": True},
    "deformable-two-stage": {**TINY["deformable"], "with_box_refine": True, "two_stage": True},
    "efficient-point": {**TINY["efficient"], "ref_init": "point"},
    "efficient-learned": {**TINY["efficient"], "ref_init": "learned", "query_init": "learned"},
}


_MODELS: dict = {}


def make(variant):
    """A tiny model of ``variant`` (a copy of one built once per session)."""
    if variant not in _MODELS:
        torch.manual_seed(0)
        model = build_model(variant.split("-")[0] if variant != "sparse-rcnn" else variant,
                            VARIANTS[variant]).eval()
        # random heads and sampling layers too, so that no term or weight is trivially zero
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "sampling_offsets" in name or "attention_weights" in name or \
                        "class_embed" in name or "bbox_embed" in name:
                    p.add_(torch.randn_like(p) * 0.2)
        _MODELS[variant] = model
    return copy.deepcopy(_MODELS[variant])


def two_images():
    return random_images([(64, 96), (80, 64)])    # the second is padded on the right


def flat(outputs):
    out = [outputs["pred_logits"], outputs["pred_boxes"]]
    for o in outputs.get("aux_outputs", []):
        out += [o["pred_logits"], o["pred_boxes"]]
    return out


def captured(model, images):
    """``capture`` after checking that it changes no output, and leaves nothing hooked."""
    with torch.inference_mode():
        plain = model(images)
    recorded, cap = capture(model, images)
    assert cap.layers and not cap._handles            # hooks recorded, then were removed
    for a, b in zip(flat(plain), flat(recorded), strict=True):
        assert torch.equal(a, b)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(flat(plain), flat(model(images))))
    return cap


@pytest.mark.parametrize("arch", sorted(TINY))
def test_capturing_does_not_change_outputs(arch):
    captured(make(arch), two_images())    # the variants: in the tests of their attention


@pytest.mark.parametrize("variant", ["detr", "detr-prenorm", "anchor-standard"])
def test_detr_terms_sum_to_the_logits_and_softmax_is_the_layers_attention(variant):
    model = make(variant)
    cap = captured(model, two_images())
    assert len(cap.layers) == model.config.dec_layers
    for rec in cap.layers:
        mha = rec["module"]
        # the key the layer received is exactly content + position
        assert torch.equal(rec["k"], rec["v"] + rec["p_k"])
        _, own = mha(rec["q"], rec["k"], rec["v"], key_padding_mask=rec["pad"],
                     need_weights=True, average_attn_weights=False)       # [B,h,Q,S]
        wq, wk, _ = mha.in_proj_weight.chunk(3)
        bq, bk, _ = mha.in_proj_bias.chunk(3)
        nh = mha.num_heads
        for b in range(2):
            queries = torch.arange(rec["q"].shape[1])
            terms = mha_terms(rec, b, queries)
            assert set(terms) == {"cq·ck", "cq·pk", "pq·ck", "pq·pk"}
            q = F.linear(rec["q"][b], wq, bq).view(-1, nh, mha.head_dim).transpose(0, 1)
            k = F.linear(rec["k"][b], wk, bk).view(-1, nh, mha.head_dim).transpose(0, 1)
            direct = q @ k.transpose(1, 2) / math.sqrt(mha.head_dim)
            torch.testing.assert_close(sum(terms.values()), direct, rtol=1e-5, atol=1e-5)
            attn = masked_softmax(sum(terms.values()), rec["pad"][b])
            torch.testing.assert_close(attn, own[b], rtol=1e-5, atol=1e-6)
            if b == 1:   # image 1 is padded: its padded keys get nothing
                assert rec["pad"][b].any() and (attn[..., rec["pad"][b]] == 0).all()
            assert not all((t.abs() < 1e-6).all() for t in terms.values())


def test_explain_detr_maps_are_the_layers_own_attention():
    model = make("detr")
    image = random_images([(64, 96)])[0]
    ex = explain(model, image, top=2)
    _, cap = capture(model, [image])
    h, w = cap.map_mask.shape[1:]
    for obj in ex:
        for layer in obj.layers:
            rec = cap.layers[layer.index]
            _, own = rec["module"](rec["q"], rec["k"], rec["v"], need_weights=True,
                                   average_attn_weights=False)
            torch.testing.assert_close(layer.attention, own[0, :, obj.query].view(-1, h, w),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sum(layer.terms.values()), layer.logits, rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(layer.attention.sum((1, 2)), torch.ones(4))
            assert sum(layer.shares.values()) == pytest.approx(1.0, abs=1e-4)
            assert layer.dominant in layer.terms
            assert all(0 <= v <= 1 for v in layer.agreement.values())
            assert 0 <= layer.entropy <= 1 + 1e-6 and 0 <= layer.in_box <= 1 + 1e-6


def test_conditional_terms_and_attention_against_sdpa_and_the_layer_output():
    model = make("conditional")
    outputs = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, a, o: outputs.append(o))
             for layer in model.transformer.decoder.layers]
    _, cap = capture(model, two_images())
    for h in hooks:
        h.remove()
    assert len(cap.layers) == len(outputs) == 2
    for rec, out in zip(cap.layers, outputs):
        mod = rec["module"]
        nh = mod.nheads
        b_, lq, d2 = rec["q"].shape
        s = rec["k"].shape[1]
        qh = rec["q"].view(b_, lq, nh, d2 // nh).transpose(1, 2)
        kh = rec["k"].view(b_, s, nh, d2 // nh).transpose(1, 2)
        # scaled_dot_product_attention with one-hot values returns its attention weights
        eye = torch.eye(s).expand(b_, nh, s, s)
        own = F.scaled_dot_product_attention(qh, kh, eye, attn_mask=~rec["pad"][:, None, None])
        for b in range(2):
            terms = conditional_terms(rec, b, torch.arange(lq))
            direct = qh[b] @ kh[b].transpose(1, 2) / math.sqrt(d2 // nh)
            torch.testing.assert_close(terms["content"] + terms["spatial"], direct,
                                       rtol=1e-5, atol=1e-5)
            attn = masked_softmax(terms["content"] + terms["spatial"], rec["pad"][b])
            torch.testing.assert_close(attn, own[b], rtol=1e-5, atol=1e-6)
            # these weights on the layer's values give the layer's output
            v = rec["v"][b].view(s, nh, -1).transpose(0, 1)                     # [h,S,dh]
            mixed = (attn @ v).transpose(0, 1).reshape(lq, -1)
            torch.testing.assert_close(mod.out_proj(mixed), out[b], rtol=1e-5, atol=1e-5)
    ex = explain(model, random_images([(64, 96)])[0], top=1)
    ref = ex[0].layers[0].reference
    assert ref.shape == (2,) and (0 <= ref[0] <= 96) and (0 <= ref[1] <= 64)


def test_anchor_row_column_attention_reproduces_the_layer_output():
    model = make("anchor")
    outputs = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, a, o: outputs.append(o))
             for layer in model.transformer.decoder_layers]
    _, cap = capture(model, two_images())
    for h in hooks:
        h.remove()
    for rec, out in zip(cap.layers, outputs, strict=True):
        mod = rec["module"]
        m = mod.nheads
        lq = rec["q_row"].shape[1]
        wv, bv = mod.in_proj_weight.chunk(5)[4], mod.in_proj_bias.chunk(5)[4]
        for b in range(2):
            ay, ax = rcda_attention(rec, b, torch.arange(lq))          # [m,Q,H], [m,Q,W]
            torch.testing.assert_close(ay.sum(-1), torch.ones_like(ay[..., 0]))
            pad = rec["pad"][b]
            assert (ax[..., pad[0]] == 0).all() and (ay[..., pad[:, 0]] == 0).all()
            attn = ay[..., :, None] * ax[..., None, :]                  # [m,Q,H,W]
            h, w, d = rec["value"][b].shape
            v = F.linear(rec["value"][b], wv, bv).view(h, w, m, d // m)
            mixed = torch.einsum("mqhw,hwmd->qmd", attn, v).reshape(lq, d)
            torch.testing.assert_close(mod.out_proj(mixed), out[b], rtol=1e-5, atol=1e-5)
    ex = explain(model, random_images([(64, 96)])[0], top=2)
    for layer in ex[0].layers:
        torch.testing.assert_close(layer.attention, layer.row[:, :, None] * layer.col[:, None])
        assert layer.reference.shape == (2,)


@pytest.mark.parametrize("variant", ["deformable", "deformable-two-stage", "efficient-learned"])
def test_sampling_points_and_weights_are_what_the_op_received(variant, monkeypatch):
    model = make(variant)
    received = []
    real = deform_attn.ms_deform_attn

    def spy(value, shapes, start, loc, weights, backend=None):
        if loc.shape[1] == model.config.num_queries:       # decoder calls (encoder: all pixels)
            received.append((loc.clone(), weights.clone(), [tuple(s) for s in shapes]))
        return real(value, shapes, start, loc, weights, backend)

    monkeypatch.setattr(deform_attn, "ms_deform_attn", spy)
    images = two_images()
    cap = captured(model, images)                 # a plain run, the capture, a plain run
    n = model.config.dec_layers
    during = received[n:2 * n]
    assert len(received) == 3 * n and len(cap.layers) == n
    for rec, (loc, weights, shapes) in zip(cap.layers, during):
        assert torch.equal(rec["loc"], loc) and torch.equal(rec["weights"], weights)
        assert rec["shapes"] == shapes
    received.clear()
    image = images[0]                                     # alone: no padding, ratios 1
    ex = explain(model, image, top=3)
    size = torch.tensor([image.shape[-1], image.shape[-2]], dtype=torch.float32)
    for obj in ex:
        for layer in obj.layers:
            loc, weights, shapes = received[layer.index]
            torch.testing.assert_close(layer.points, loc[0, obj.query] * size)
            torch.testing.assert_close(layer.weights, weights[0, obj.query])
            torch.testing.assert_close(layer.weights.sum((1, 2)), torch.ones(4))
            assert layer.levels == shapes and len(layer.spread) == len(shapes)
            assert sum(layer.level_weight) == pytest.approx(1.0, abs=1e-5)
            assert layer.reference.shape in ((2,), (4,))


@pytest.mark.parametrize("arch", ["sparse-rcnn", "dynamic"])
def test_stage_boxes_are_the_models_and_the_grid_is_roi_aligns(arch):
    model = make(arch)
    image = random_images([(64, 96)])[0]
    with torch.inference_mode():
        out = model([image])
    ex = explain(model, image, top=3)
    size = torch.tensor([96.0, 64.0])
    per_layer = [*out["aux_outputs"], out]
    for obj in ex:
        assert [l.index for l in obj.layers] == list(range(len(per_layer)))
        for layer, o in zip(obj.layers, per_layer):
            want = box_convert(o["pred_boxes"][0, obj.query], "cxcywh", "xyxy") * size.repeat(2)
            torch.testing.assert_close(layer.box, want, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(obj.layers[0].roi, torch.tensor([0.0, 0.0, 96.0, 64.0]))
        for a, b in zip(obj.layers, obj.layers[1:]):
            torch.testing.assert_close(b.roi, a.box)          # each stage pools the last box
        # RoIAlign of a map holding its own coordinates returns the bin centres
        layer = obj.layers[1]
        stride = 2 ** layer.roi_level
        ys, xs = torch.meshgrid(torch.arange(200.0), torch.arange(200.0), indexing="ij")
        coords = torch.stack([xs, ys])[None] - 50            # cover boxes outside the image
        box = (layer.roi / stride + 50) * stride
        pooled = roi_align(coords, [box[None]], model.config.pooler_resolution,
                           spatial_scale=1 / stride, sampling_ratio=2, aligned=True)[0]
        centres = ((pooled + 0.5) * stride).flatten(1).T
        torch.testing.assert_close(layer.grid, centres, rtol=1e-4, atol=1e-3)


def test_dynamic_scale_attention_reproduces_the_encoder_block():
    model = make("dynamic")
    ios = []
    block = model.encoder.blocks[0]
    hook = block.register_forward_hook(lambda m, a, o: ios.append((a[0], o)))
    ex = explain(model, random_images([(64, 96)])[0], top=1)
    hook.remove()
    weights = ex.scale_attention                               # [blocks, levels, 3]
    feats, out = ios[0]
    assert weights.shape == (1, len(feats), 3)
    assert torch.isnan(weights[0, 0, 0]) and torch.isnan(weights[0, -1, 2])
    with torch.no_grad():
        for lvl, x in enumerate(feats):
            om = block.offset(x)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            terms = []
            for role in (1, 0, 2):
                j = lvl + role - 1
                if not 0 <= j < len(feats):
                    continue
                src = F.interpolate(feats[j], size=x.shape[-2:], mode="bilinear",
                                    align_corners=False) if j != lvl else x
                t = block.norm[role](block.deform(role, src, offset, mask))
                terms.append(t * float(weights[0, lvl, role]))
            torch.testing.assert_close(block.dyrelu(torch.stack(terms).mean(0)), out[lvl],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_explain_on_the_fast_path_matches_eager(arch):
    model = make(arch)
    with torch.no_grad():     # trainable BN with non-trivial statistics, to fold for real
        for name, t in model.state_dict().items():
            if "running_var" in name:
                t.copy_(torch.rand_like(t) + 0.5)
    fast = optimize_for_inference(copy.deepcopy(model))
    image = random_images([(64, 96)])[0]
    a, b = explain(model, image, top=2), explain(fast, image, top=2)
    assert [o.query for o in a] == [o.query for o in b]
    layer = b[0].layers[-1]                    # each method explained with its own fields
    assert b.num_layers == len(b[0].layers)
    if b.kind == "attention":
        assert layer.attention is not None and layer.entropy is not None
        assert (layer.terms is not None) == (arch in ("detr", "conditional"))
        assert (layer.row is not None) == (arch == "anchor")
    elif b.kind == "sampling":
        assert arch in ("deformable", "efficient", "dino") and layer.points is not None
    else:
        assert arch in ("sparse-rcnn", "dynamic") and layer.roi is not None
        assert (b.scale_attention is not None) == (arch == "dynamic")
    for oa, ob in zip(a, b):
        torch.testing.assert_close(oa.box, ob.box, rtol=1e-4, atol=1e-3)
        for la, lb in zip(oa.layers, ob.layers, strict=True):
            for field in ("attention", "points", "weights", "box", "roi"):
                if getattr(la, field) is not None:
                    torch.testing.assert_close(getattr(la, field), getattr(lb, field),
                                               rtol=1e-4, atol=1e-3)


def test_encoder_attention_of_one_position_is_the_encoders_own():
    model = make("detr")
    image = random_images([(64, 96)])[0]
    ex = explain(model, image, top=1, encoder=(70.0, 20.0))
    _, cap = capture(model, [image])
    h, w = cap.map_mask.shape[1:]
    i, j = ex.encoder["cell"]
    assert (i, j) == (int(20 / 64 * h), int(70 / 96 * w))
    for rec, att in zip(cap.encoder, ex.encoder["attention"], strict=True):
        _, own = rec["module"](rec["q"], rec["k"], rec["k"], need_weights=True,
                               average_attn_weights=False)
        torch.testing.assert_close(att, own[0, :, i * w + j].view(-1, h, w), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="DETR encoder"):
        explain(make("deformable"), image, encoder=(10, 10))


def test_queries_layers_and_image_kinds(tmp_path):
    from PIL import Image

    from qdet.data.transforms import eval_transform

    model = make("conditional")
    model.preprocess = {"size": 64, "max_size": None}
    g = torch.Generator().manual_seed(0)
    pil = Image.fromarray((torch.rand(96, 128, 3, generator=g) * 255).byte().numpy())
    pil.save(tmp_path / "im.png")
    a = explain(model, pil, queries=[4, 1], layers=-1)
    b = explain(model, tmp_path / "im.png", queries=[4, 1], layers=-1)
    x = eval_transform(pil, 64, None)                          # [3,64,85]
    c = explain(model, x, queries=[4, 1], layers=[1])
    assert [o.query for o in a] == [4, 1] and [l.index for l in a[0].layers] == [1]
    assert a.image_size == (128, 96) and c.image_size == (85, 64)
    for oa, ob, oc in zip(a, b, c):
        torch.testing.assert_close(oa.layers[0].attention, ob.layers[0].attention)
        torch.testing.assert_close(oa.layers[0].attention, oc.layers[0].attention)
        k = torch.tensor([128 / 85, 96 / 64]).repeat(2)
        torch.testing.assert_close(oa.box, oc.box * k, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="query 6 is out of range"):
        explain(model, x, queries=[6])
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        explain(model, x, layers=2)


def test_top_is_the_best_scoring_queries():
    model = make("detr")
    image = random_images([(64, 96)])[0]
    with torch.inference_mode():
        probs = model([image])["pred_logits"][0].softmax(-1)[:, :-1]
    ex = qdet.explain(model, image, top=3)                 # the package exports the function
    best = probs.max(-1).values.argsort(descending=True)[:3].tolist()
    assert [o.query for o in ex] == best
    assert [o.score for o in ex] == pytest.approx(probs.max(-1).values[best].tolist())
    assert [o.label for o in ex] == probs.argmax(-1)[best].tolist()


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from qdet.data.shapes import ShapesConfig, render
    from qdet.weights.checkpoint import model_checkpoint, save_checkpoint

    tmp_path = tmp_path_factory.mktemp("explain_cli")
    paths = {}
    for arch in ("detr", "deformable", "sparse-rcnn"):
        model = make(arch)
        model.preprocess = {"size": 64, "max_size": None}
        model.class_names = ["rectangle", "ellipse", "triangle", "cross", "star"]
        paths[arch] = tmp_path / f"{arch}.pt"
        save_checkpoint(paths[arch], model_checkpoint(model))
    render(ShapesConfig(image_size=64), "val", 0)[0].save(tmp_path / "photo.png")
    return tmp_path, paths


def test_cli_writes_a_figure_and_json(tiny_checkpoints):
    from PIL import Image
    from typer.testing import CliRunner

    from qdet.cli.app import app

    tmp, paths = tiny_checkpoints
    runner = CliRunner()
    for arch, extra in (("detr", ["--encoder", "20,30", "--heads", "--top", "1"]),
                        ("deformable", []), ("sparse-rcnn", ["--layer", "-1"])):
        png = tmp / f"{arch}.png"
        r = runner.invoke(app, ["explain", str(tmp / "photo.png"), "--weights", str(paths[arch]),
                                "--save", str(png), "--json", *extra])
        assert r.exit_code == 0, r.output
        data, _ = json.JSONDecoder().raw_decode(r.output[r.output.index("{"):])
        assert data["arch"] == arch and len(data["objects"]) == (1 if arch == "detr" else 3)
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100
        layers = data["objects"][0]["layers"]
        if arch == "detr":
            assert len(layers) == 2 and set(layers[0]["terms"]) == {"cq·ck", "cq·pk", "pq·ck",
                                                                     "pq·pk"}
            assert "encoder" in data
        elif arch == "deformable":
            assert len(layers[0]["points"]) == 4 and len(layers[0]["spread"]) == 3
        else:
            assert [l["index"] for l in layers] == [1] and len(layers[0]["grid"]) == 49
    r = runner.invoke(app, ["explain", str(tmp / "photo.png"), "--weights", str(paths["detr"]),
                            "--query", "1", "--query", "4", "--layer", "0",
                            "--save", str(tmp / "q.png")])
    assert r.exit_code == 0, r.output
    assert "object 0: query 1" in r.output and "object 1: query 4" in r.output
    assert "terms of the logit" in r.output and "figure saved to" in r.output


def test_cli_uses_the_latest_run_and_says_what_is_wrong(tiny_checkpoints, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from qdet.cli.app import app

    tmp, paths = tiny_checkpoints
    tmp = tmp / "cwd"
    tmp.mkdir()
    shutil.copy(tmp.parent / "photo.png", tmp / "photo.png")
    monkeypatch.chdir(tmp)
    runner = CliRunner()
    r = runner.invoke(app, ["explain", "photo.png"])
    assert r.exit_code == 1 and "no --weights given and no run found" in r.output
    (tmp / "runs" / "a").mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        shutil.copy(paths["detr"], tmp / "runs" / "a" / name)
    r = runner.invoke(app, ["explain", "photo.png", "--top", "1"])
    assert r.exit_code == 0, r.output
    assert "best checkpoint of the most recent run" in r.output
    assert (tmp / "explain" / "photo_explain.png").is_file()
    for args, message in (
            (["missing.png"], "image missing.png not found"),
            (["photo.png", "--top", "2", "--query", "1"], "give --top or --query, not both"),
            (["photo.png", "--query", "6"], "query 6 is out of range"),
            (["photo.png", "--layer", "5"], "layer 5 is out of range"),
            (["photo.png", "--layer", "last"], "--layer expects an index"),
            (["photo.png", "--encoder", "3"], "--encoder expects a pixel position"),
            (["photo.png", "--encoder", "300,3"], "outside the image")):
        r = runner.invoke(app, ["explain", *args])
        assert r.exit_code == 1 and message in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_report_measures_terms_and_spread_on_tiny_runs(tmp_path):
    from typer.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from qdet.data.shapes import ShapesConfig, render
    from qdet.weights.checkpoint import model_checkpoint, save_checkpoint

    import explain_report  # scripts/explain_report.py: the README figure's script

    shapes = {"image_size": 64, "val_images": 1}
    runs = []
    for arch in ("detr", "deformable"):
        model = make(arch)
        model.preprocess = {"size": 64, "max_size": None}
        (tmp_path / arch).mkdir()
        save_checkpoint(tmp_path / arch / "best.pt", model_checkpoint(
            model, data={"kind": "shapes"}, train={"shapes": shapes}))
        runs.append(str(tmp_path / arch))
    out = tmp_path / "docs" / "explain.png"
    r = CliRunner().invoke(explain_report.app, [*runs, "--images", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    reports = json.loads(out.with_suffix(".json").read_text())
    n_objects = len(render(ShapesConfig(**shapes), "val", 0)[1])
    assert [rep["arch"] for rep in reports] == ["detr", "deformable"]
    assert all(rep["objects"] == n_objects and len(rep["layers"]) == 2 for rep in reports)
    for layer in reports[0]["layers"]:
        terms = ("cq·ck", "cq·pk", "pq·ck", "pq·pk")
        assert sum(layer[f"share {t}"] for t in terms) == pytest.approx(1.0, abs=1e-4)
        assert 0 <= layer["inside"] <= 1 and layer["offset"] >= 0
    deform = reports[1]
    assert [tuple(s) for s in deform["levels"]] == [(8, 8), (4, 4), (2, 2)]
    for layer in deform["layers"]:
        assert sum(layer[f"weight {i}"] for i in range(3)) == pytest.approx(1.0, abs=1e-5)
        for i, (h, w) in enumerate(deform["levels"]):
            assert layer[f"cells {i}"] == pytest.approx(layer[f"spread {i}"] / (64 / w))
    assert out.is_file() and "| layer |" in out.with_suffix(".md").read_text()
    assert all((out.parent / f"explain-{a}.png").is_file() for a in ("detr", "deformable"))
    assert "where each term alone would look" in r.output


def test_an_onnx_file_is_refused_in_one_line(tiny_checkpoints):
    """``qdet explain --weights model.onnx`` (an OnnxDetector has no layers to hook) answers
    in one line, from the CLI and from Python."""
    from typer.testing import CliRunner

    from qdet.cli.app import app

    tmp, paths = tiny_checkpoints
    onnx = tmp / "detr.onnx"
    qdet.export(qdet.load(paths["detr"]), onnx, check=False)
    r = CliRunner().invoke(app, ["explain", str(tmp / "photo.png"), "--weights", str(onnx)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        "error: explain needs the PyTorch model (it hooks its attention layers): pass the "
        "checkpoint the ONNX file was exported from"]
    with pytest.raises(ValueError, match="needs a PyTorch qdet model"):
        qdet.explain(qdet.load(onnx), tmp / "photo.png")


def test_layers_are_probed_by_argument_name(monkeypatch):
    """Every argument the hooks read exists in the hooked forward's signature (a renamed
    argument in a method file fails here, not silently in ``qdet explain``); arguments
    passed by position or by keyword are read alike; a probe for a name that is gone is one
    error naming the class and the name."""
    from qdet.models.detr import DecoderLayer
    from qdet.tools import explain_capture

    explain_capture.check_probes()
    layer = DecoderLayer(8, 2, 16, 0.0, False)
    by_position = explain_capture.named(layer, (1, 2, 3, 4, 5), {})
    by_keyword = explain_capture.named(layer, (1, 2), {"pos": 3, "query_pos": 4, "pad": 5})
    assert by_position == by_keyword and by_position["query_pos"] == 4
    monkeypatch.setattr(explain_capture, "probes", lambda: {DecoderLayer: ("query_position",)})
    with pytest.raises(ValueError, match=r"qdet\.models\.detr\.DecoderLayer\.forward's "
                                         r"argument\(s\) \['query_position'\]"):
        explain_capture.check_probes()
