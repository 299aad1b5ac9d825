"""``qdet.explain``: where each object query looks, and which part of its attention decides.

The methods differ above all in how a query finds its object (``methods-notes``):

- DETR adds positions to contents, so a cross-attention logit is
  ``(c_q + p_q)^T (c_k + p_k) = c_q.c_k + c_q.p_k + p_q.c_k + p_q.p_k`` (per head, after the
  layer's projections, divided by sqrt(head dim)). The four terms are returned as maps that sum
  to ``.logits``; the projections' biases go with the content parts (``c_q`` stands for
  ``W_q c_q + b_q``), so the sum is exactly the logit the layer used.
- Conditional DETR concatenates per head, so the logit is ``content + spatial`` (in the first
  layer the content halves also carry DETR's added positions, as the paper keeps them).
- Anchor DETR (row-column decoupled attention) attends over the columns (``.col``, A_x over W)
  and the rows (``.row``, A_y over H); its 2-d attention is their outer product.
- Deformable DETR (every variant) and Efficient DETR sample a few points per head and level
  around a reference point or box: ``.points`` and ``.weights`` are what the
  deformable-attention op received (``MSDeformAttn.sampling``).
- Sparse R-CNN and Dynamic DETR refine a box stage by stage: ``.roi`` (the box a stage pools,
  with its RoIAlign bin centres ``.grid``) and ``.box`` (the box it outputs); Dynamic DETR's
  encoder also weighs the levels (``Explanations.scale_attention``).

Everything is captured by forward hooks on the modules during one ordinary forward pass (the
outputs do not change) and recomputed from the captured inputs and the layer's own weights.
Coordinates are pixels of the image as given, in the model's own frame: its normalized
coordinates (feature maps span the image) times the image's size.

Summaries per layer (also in the table of ``qdet explain``):

- ``entropy``: of each head's attention (or sampling weights), divided by its maximum (log of
  the number of keys or points), averaged over heads: 0 = one key, 1 = uniform.
- ``in_box``: the attention mass (or sampling weight) whose key centre (or point) lies inside
  the object's final box, averaged over heads.
- ``shares``: per term, the part of the variance of the logits over the keys it accounts for,
  ``cov(term, logits) / var(logits)`` per head, averaged over heads. The shares sum to 1
  (a term can be negative when it works against the others); ``dominant`` is the largest.
- ``agreement``: per term, the fraction of heads whose term alone peaks at the same key as the
  full logits.
- ``level_weight`` and ``spread`` (sampling methods): per level, the sampling weight it gets
  (averaged over heads) and the weighted root-mean-square distance of its points from the
  reference point, in pixels.

XX
other names with ``from qdet.explainer import ...``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from .base import Detector, class_probs

DETR_TERMS = ("cq·ck", "cq·pk", "pq·ck", "pq·pk")
CONDITIONAL_TERMS = ("content", "spatial")
KIND = {"mha": "attention", "conditional": "attention", "rcda": "attention",
        "deform": "sampling", "stage": "stage"}


@dataclass
class LayerExplanation:
    """One decoder layer (or stage) of one object. Fields that do not apply to the method
    are None; shapes per field below, coordinates in pixels (x, y)."""
    index: int
    box: Tensor | None = None           # [4] x0,y0,x1,y1: this layer's box for the query
    score: float | None = None          # this layer's probability of the object's class
    attention: Tensor | None = None     # [heads,H,W], each head sums to 1
    row: Tensor | None = None           # [heads,H] Anchor DETR's A_y
    col: Tensor | None = None           # [heads,W] Anchor DETR's A_x
    logits: Tensor | None = None        # [heads,H,W] before the padding mask
    terms: dict[str, Tensor] | None = None   # name -> [heads,H,W], sum = logits
    reference: Tensor | None = None     # [2] point or [4] x0,y0,x1,y1 box
    points: Tensor | None = None        # [heads,levels,points,2]
    weights: Tensor | None = None       # [heads,levels,points], each head sums to 1
    levels: list[tuple[int, int]] | None = None   # (H, W) of each level's map
    roi: Tensor | None = None           # [4] the box this stage pooled
    grid: Tensor | None = None          # [r*r,2] centres of its RoIAlign bins
    roi_level: int | None = None        # log2 of the stride of the level it pooled from
    entropy: float | None = None
    in_box: float | None = None
    shares: dict[str, float] | None = None
    agreement: dict[str, float] | None = None
    level_weight: list[float] | None = None
    spread: list[float] | None = None

    @property
    def dominant(self) -> str | None:
        """The term with the largest variance share, where the logit decomposes."""
        return max(self.shares, key=self.shares.get) if self.shares else None


@dataclass
class ObjectExplanation:
    query: int
    label: int
    name: str
    score: float                        # final probability of ``label``
    box: Tensor                         # [4] final box, x0,y0,x1,y1 pixels
    layers: list[LayerExplanation]


class Explanations(list):
    """The explained objects (a list of :class:`ObjectExplanation`) and what belongs to the
    whole image: ``arch``, ``kind`` ("attention", "sampling" or "stage"), ``image`` (a PIL
    image to draw on), ``image_size`` (W, H), ``num_layers``, ``scale_attention`` (Dynamic
    DETR: ``[blocks, levels, 3]`` weights of the finer, same and coarser level's term, NaN
    where a level has no such neighbour) and ``encoder`` (with ``encoder=(x, y)``: the
    position, its cell, and ``attention [layers, heads, H, W]``)."""

    def __init__(self, objects, **info):
        super().__init__(objects)
        self.arch: str = info.get("arch", "")
        self.kind: str = info.get("kind", "")
        self.image = info.get("image")
        self.image_size: tuple[int, int] = info.get("image_size", (0, 0))
        self.num_layers: int = info.get("num_layers", 0)
        self.class_names: list[str] = info.get("class_names", [])
        self.scale_attention: Tensor | None = info.get("scale_attention")
        self.encoder: dict | None = info.get("encoder")


# ----------------------------------------------------------------------- capturing


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


class Capture:
    """Forward hooks that record, during one forward pass, what each attention layer
    received: a context manager; ``layers`` holds one record per decoder layer (or stage) in
    call order, ``encoder`` one per DETR encoder layer, ``scale`` Dynamic DETR's scale
    attention per encoder block."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: list[dict] = []
        self.encoder: list[dict] = []
        self.scale: list[dict] = []
        self.map_mask: Tensor | None = None     # [B,H,W] single-map methods' padding
        self.ratios: Tensor | None = None       # [B,L,2] deformable decoders' valid ratios
        self.reference: Tensor | None = None    # [B,Q,2] Conditional DETR's reference points
        self._pending: dict = {}
        self._handles: list = []
        self._current_module: nn.Module | None = None

    def __enter__(self) -> "Capture":
        from . import anchor_detr, conditional_detr, detr
        from .dynamic_detr import EncoderBlock
        from .dynamic_head import RCNNHead
        from .layers import DETREncoderLayer, DeformableDecoder, DeformableDecoderLayer

        pre = self._pre
        for m in self.model.modules():
            if isinstance(m, (detr.Transformer, conditional_detr.Transformer)):
                pre(m, lambda a, k: setattr(self, "map_mask", _arg(a, k, 1, "mask")))
            elif isinstance(m, detr.DecoderLayer):
                pre(m, lambda a, k: self._pending.update(
                    p_q=_arg(a, k, 3, "query_pos"), p_k=_arg(a, k, 2, "pos"), map_mask=None))
                pre(m.multihead_attn, self._mha)
            elif isinstance(m, anchor_detr.DecoderLayer):
                if m.rcda:
                    pre(m.cross_attn, self._rcda)
                else:
                    pre(m, self._anchor_standard_layer)
                    pre(m.cross_attn, self._mha)
            elif isinstance(m, conditional_detr.DecoderLayer):
                pre(m.cross_attn, self._conditional)
            elif isinstance(m, conditional_detr.Decoder):
                self._handles.append(m.ref_point_head.register_forward_hook(
                    lambda mod, a, out: setattr(self, "reference", out.sigmoid())))
            elif isinstance(m, DeformableDecoder):
                pre(m, lambda a, k: setattr(self, "ratios", _arg(a, k, 5, "valid_ratios")))
            elif isinstance(m, DeformableDecoderLayer):
                pre(m.cross_attn, self._deform)
            elif isinstance(m, RCNNHead):
                self._handles.append(m.register_forward_hook(self._stage, with_kwargs=True))
            elif isinstance(m, DETREncoderLayer):
                pre(m.self_attn, self._encoder)
            elif isinstance(m, EncoderBlock):
                pre(m, lambda a, k: self.scale.append({"levels": len(a[0]), "weights": []}))
                self._handles.append(m.scale_attn.register_forward_hook(
                    lambda mod, a, out: self.scale[-1]["weights"].append(out.flatten(1)[:, 0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module, fn) -> None:
        """A forward pre-hook calling ``fn(args, kwargs)`` with ``self._current_module`` set
        to the module it fires for."""
        def hook(mod, args, kwargs):
            self._current_module = mod
            fn(args, kwargs)
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    # --- per attention kind: what the layer received
    def _anchor_standard_layer(self, a, k):
        mem, pos_2d = _arg(a, k, 4, "mem"), _arg(a, k, 8, "pos_2d")
        b, h, w, d = mem.shape
        self._pending.update(p_q=_arg(a, k, 1, "qpos"), p_k=pos_2d.reshape(b, h * w, d),
                             map_mask=_arg(a, k, 5, "pad"))

    def _mha(self, a, k):
        # nn.MultiheadAttention(query, key, value, key_padding_mask=...); the enclosing
        # layer's pre-hook has just stored the positional parts p_q and p_k
        mha = self._current_module
        self.layers.append({"kind": "mha", "module": mha, "q": _arg(a, k, 0, "query"),
                            "k": _arg(a, k, 1, "key"), "v": _arg(a, k, 2, "value"),
                            "pad": k.get("key_padding_mask"), **self._pending})
        self._pending = {}

    def _conditional(self, a, k):
        self.layers.append({"kind": "conditional", "module": self._current_module,
                            "q": a[0], "k": a[1], "v": a[2], "pad": _arg(a, k, 3, "pad")})

    def _rcda(self, a, k):
        names = ("q_row", "q_col", "k_row", "k_col", "value", "pad")
        self.layers.append({"kind": "rcda", "module": self._current_module,
                            **{n: _arg(a, k, i, n) for i, n in enumerate(names)}})

    def _deform(self, a, k):
        mod = self._current_module
        query, ref, shapes = a[0], a[1], a[3]
        loc, weights = mod.sampling(query, ref, shapes)
        self.layers.append({"kind": "deform", "module": mod, "loc": loc, "weights": weights,
                            "ref": ref, "shapes": [tuple(int(v) for v in s) for s in shapes],
                            "ratios": self.ratios})

    def _stage(self, mod, args, kwargs, out):
        features, boxes = _arg(args, kwargs, 0, "features"), _arg(args, kwargs, 1, "boxes")
        self.layers.append({"kind": "stage", "roi": boxes, "boxes": out[1],
                            "first_level": mod.first_level, "num_levels": len(features),
                            "resolution": mod.resolution})

    def _encoder(self, a, k):
        self.encoder.append({"module": self._current_module, "q": _arg(a, k, 0, "query"),
                             "k": _arg(a, k, 1, "key"), "pad": k.get("key_padding_mask")})


def capture(model: nn.Module, images) -> tuple[dict, Capture]:
    """Run ``model`` on ``images`` (as its forward takes them) with every recording hook in
    place; returns the ordinary outputs and the :class:`Capture`."""
    with torch.no_grad(), Capture(model) as cap:
        out = model(images)
    return out, cap


# ---------------------------------------------------------------- the decompositions


def _heads(t: Tensor, nh: int) -> Tensor:
    """[n, d] -> [heads, n, d/heads]."""
    return t.reshape(t.shape[0], nh, t.shape[1] // nh).transpose(0, 1)


def mha_terms(rec: dict, b: int, queries: Tensor) -> dict[str, Tensor]:
    """DETR's four terms ``[heads, len(queries), S]`` for image ``b`` of an
    nn.MultiheadAttention record; the projections' biases go with the content parts."""
    mha: nn.MultiheadAttention = rec["module"]
    nh = mha.num_heads
    wq, wk, _ = mha.in_proj_weight.chunk(3)
    bq = bk = None
    if mha.in_proj_bias is not None:
        bq, bk, _ = mha.in_proj_bias.chunk(3)
    p_q = rec["p_q"][b, queries]
    c_q = rec["q"][b, queries] - p_q            # the layer added them: query = c_q + p_q
    c_k, p_k = rec["v"][b], rec["p_k"][b]       # key = value + position
    qc, qp = _heads(F.linear(c_q, wq, bq), nh), _heads(F.linear(p_q, wq), nh)
    kc, kp = _heads(F.linear(c_k, wk, bk), nh), _heads(F.linear(p_k, wk), nh)
    s = (mha.embed_dim // nh) ** -0.5
    return {"cq·ck": qc @ kc.transpose(1, 2) * s, "cq·pk": qc @ kp.transpose(1, 2) * s,
            "pq·ck": qp @ kc.transpose(1, 2) * s, "pq·pk": qp @ kp.transpose(1, 2) * s}


def conditional_terms(rec: dict, b: int, queries: Tensor) -> dict[str, Tensor]:
    """Conditional DETR's content and spatial terms ``[heads, len(queries), S]``: each
    head's query and key are [content ; spatial], scaled by 1/sqrt(2 d/heads)."""
    nh = rec["module"].nheads
    q, k = rec["q"][b, queries], rec["k"][b]
    dq = q.shape[-1] // nh
    qh = q.view(len(queries), nh, 2, dq // 2)
    kh = k.view(k.shape[0], nh, 2, dq // 2)
    s = dq ** -0.5
    return {name: torch.einsum("qhd,khd->hqk", qh[:, :, i], kh[:, :, i]) * s
            for i, name in enumerate(CONDITIONAL_TERMS)}


def rcda_attention(rec: dict, b: int, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Anchor DETR's row-column attention of image ``b``: ``A_y [heads, n, H]`` (over rows)
    and ``A_x [heads, n, W]`` (over columns), recomputed from the layer's inputs and
    weights as :class:`qdet.anchor_detr.RCDA` computes them."""
    mod = rec["module"]
    m = mod.nheads
    d = rec["q_row"].shape[-1]
    dh = d // m
    wq_r, wq_c, wk_r, wk_c, _ = mod.in_proj_weight.chunk(5)
    bq_r, bq_c, bk_r, bk_c, _ = mod.in_proj_bias.chunk(5)
    qx = _heads(F.linear(rec["q_row"][b, queries], wq_r, bq_r) * dh ** -0.5, m)  # [m,n,dh]
    qy = _heads(F.linear(rec["q_col"][b, queries], wq_c, bq_c) * dh ** -0.5, m)
    kx = _heads(F.linear(rec["k_row"][b], wk_r, bk_r).mean(0), m)             # [m,W,dh]
    ky = _heads(F.linear(rec["k_col"][b], wk_c, bk_c).mean(1), m)             # [m,H,dh]
    pad = rec["pad"][b]
    ax = (qx @ kx.transpose(1, 2)).masked_fill(pad[None, None, 0, :], float("-inf"))
    ay = (qy @ ky.transpose(1, 2)).masked_fill(pad[None, None, :, 0], float("-inf"))
    return ay.softmax(-1), ax.softmax(-1)


def masked_softmax(logits: Tensor, pad: Tensor | None) -> Tensor:
    """Softmax over the last axis with padded keys (``pad`` True, broadcast) excluded."""
    if pad is not None:
        logits = logits.masked_fill(pad, float("-inf"))
    return logits.softmax(-1)


def variance_shares(terms: dict[str, Tensor], valid: Tensor) -> tuple[dict, dict]:
    """Per term: ``cov(term, logits) / var(logits)`` over the valid keys, per head, averaged
    over heads (the shares sum to 1); and the fraction of heads whose term alone peaks where
    the logits do. ``terms``: name -> ``[heads, S]``; ``valid``: ``[S]``."""
    total = sum(terms.values())[:, valid]                                   # [h, S']
    centred = total - total.mean(-1, keepdim=True)
    var = (centred ** 2).mean(-1)
    peak = total.argmax(-1)
    shares, agree = {}, {}
    ok = var > 0
    for name, t in terms.items():
        t = t[:, valid]
        cov = ((t - t.mean(-1, keepdim=True)) * centred).mean(-1)
        shares[name] = float((cov[ok] / var[ok]).mean()) if ok.any() else float("nan")
        agree[name] = float((t.argmax(-1) == peak).float().mean())
    return shares, agree


def normalized_entropy(p: Tensor, n: int) -> float:
    """Mean over heads of the entropy of ``p [heads, K]`` divided by log(n)."""
    if n <= 1:
        return 0.0
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return float((h / math.log(n)).mean())


# --------------------------------------------------------------------------- explain


def _prepare(model: Detector, image):
    """(input tensor [3,h,w], PIL image to draw on, (W, H) of the image as given)."""
    from PIL import Image

    from .data import eval_transform, load_image

    if isinstance(image, (str, Path)):
        image = load_image(Path(image))
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        x = eval_transform(image, model.preprocess["size"], model.preprocess["max_size"])
        return x, image, image.size
    if isinstance(image, Tensor):
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a normalized image tensor [3,H,W], got shape "
                             f"{tuple(image.shape)}")
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        rgb = ((image.detach().float().cpu() * std + mean).clamp(0, 1) * 255).byte()
        pil = Image.fromarray(rgb.permute(1, 2, 0).numpy())
        return image, pil, (int(image.shape[-1]), int(image.shape[-2]))
    raise TypeError(f"image must be a PIL image, a path or a [3,H,W] tensor, not "
                    f"{type(image).__name__}")


def _pick_layers(layers, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    picked = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in picked:
        if not -n <= i < n:
            raise ValueError(f"layer {i} is out of range: the model has {n} decoder "
                             f"layers (0-{n - 1})")
        out.append(i % n)
    return out


def _cell_centres(valid_hw: tuple[int, int], hw: tuple[int, int], size) -> tuple[Tensor,
                                                                                    Tensor]:
    """Pixel centres (x [W], y [H]) of a map's cells whose valid part spans the image."""
    (vh, vw), (h, w) = valid_hw, hw
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / vw * size[0]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / vh * size[1]
    return xs, ys


def _inside(x: Tensor, y: Tensor, box: Tensor) -> Tensor:
    return (x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3])


def _map_layer(layer: LayerExplanation, rec: dict, b: int, q: int, box: Tensor, size,
               cap: Capture) -> None:
    """Fill the attention fields of ``layer`` from a DETR-style or Conditional record."""
    qi = torch.tensor([q], device=rec["q"].device)
    if rec["kind"] == "mha":
        terms = mha_terms(rec, b, qi)
        mask = cap.map_mask if rec.get("map_mask") is None else rec["map_mask"]
    else:
        terms = conditional_terms(rec, b, qi)
        mask = cap.map_mask
    mask = mask[b]                                                            # [H,W]
    h, w = mask.shape
    pad = rec["pad"][b] if rec["pad"] is not None else torch.zeros(h * w, dtype=torch.bool,
                                                                    device=mask.device)
    logits = sum(terms.values())                                              # [heads,1,S]
    attn = masked_softmax(logits, pad)
    terms = {k: v[:, 0].float().cpu() for k, v in terms.items()}
    valid = ~pad.cpu()
    layer.shares, layer.agreement = variance_shares(terms, valid)
    layer.logits = logits[:, 0].float().cpu().view(-1, h, w)
    layer.terms = {k: v.view(-1, h, w) for k, v in terms.items()}
    layer.attention = attn[:, 0].float().cpu().view(-1, h, w)
    _attention_summary(layer, mask.cpu(), box, size)
    if rec["kind"] == "conditional" and cap.reference is not None:
        layer.reference = cap.reference[b, q].float().cpu() * torch.tensor(size,
                                                                            dtype=torch.float32)


def _attention_summary(layer: LayerExplanation, mask: Tensor, box: Tensor, size) -> None:
    """Entropy and in-box mass of ``layer.attention`` over the unpadded cells."""
    valid = ~mask
    h, w = mask.shape
    vh, vw = int(valid[:, 0].sum()), int(valid[0].sum())
    xs, ys = _cell_centres((vh, vw), (h, w), size)
    inside = _inside(xs[None, :], ys[:, None], box) & valid                  # [H,W]
    a = layer.attention
    layer.entropy = normalized_entropy(a.flatten(1)[:, valid.flatten()], int(valid.sum()))
    layer.in_box = float(a[:, inside].sum(-1).mean())


def _rcda_layer(layer: LayerExplanation, rec: dict, b: int, q: int, box: Tensor, size,
                reference: Tensor | None) -> None:
    qi = torch.tensor([q], device=rec["q_row"].device)
    ay, ax = rcda_attention(rec, b, qi)
    layer.row, layer.col = ay[:, 0].float().cpu(), ax[:, 0].float().cpu()   # [m,H], [m,W]
    layer.attention = layer.row[:, :, None] * layer.col[:, None, :]
    _attention_summary(layer, rec["pad"][b].cpu(), box, size)
    if reference is not None:
        layer.reference = reference


def _deform_layer(layer: LayerExplanation, rec: dict, b: int, q: int, box: Tensor,
                  size) -> None:
    loc = rec["loc"][b, q].float().cpu()                                      # [M,L,P,2]
    w = rec["weights"][b, q].float().cpu()                                    # [M,L,P]
    ref = rec["ref"][b, q, 0].float().cpu()                                   # [2] or [4]
    ratios = rec["ratios"]
    scale = torch.tensor(size, dtype=torch.float32)
    if ratios is not None:   # the op's coordinates are relative to the padded maps
        r = ratios[b].float().cpu()                                           # [L,2]
        loc = loc / r[None, :, None, :]
        ref = ref / (r[0] if ref.shape[0] == 2 else torch.cat([r[0], r[0]]))
    pts = loc * scale
    layer.points, layer.weights, layer.levels = pts, w, rec["shapes"]
    if ref.shape[0] == 2:
        layer.reference = ref * scale
        centre = layer.reference
    else:
        layer.reference = box_convert(ref[None], "cxcywh", "xyxy")[0] * scale.repeat(2)
        centre = ref[:2] * scale
    m, nl, p = w.shape
    layer.entropy = normalized_entropy(w.view(m, -1), nl * p)
    inside = _inside(pts[..., 0], pts[..., 1], box)
    layer.in_box = float((w * inside).sum((1, 2)).mean())
    lw = w.sum(-1)                                                            # [M,L]
    layer.level_weight = [float(v) for v in lw.mean(0)]
    d2 = ((pts - centre) ** 2).sum(-1)                                        # [M,L,P]
    layer.spread = [float(((w[:, i] * d2[:, i]).sum() / w[:, i].sum().clamp_min(1e-12)).sqrt())
                    for i in range(nl)]


def _stage_layer(layer: LayerExplanation, rec: dict, b: int, q: int, sxy: Tensor) -> None:
    from .dynamic_head import roi_levels

    roi = rec["roi"][b, q].float()
    layer.roi_level = int(roi_levels(roi[None], rec["first_level"], rec["num_levels"])[0])
    roi = roi.cpu() * sxy.repeat(2)
    r = rec["resolution"]
    # aligned RoIAlign: bin (i, j) is centred at x0 + (j + 0.5) * w / r in image coordinates
    c = (torch.arange(r, dtype=torch.float32) + 0.5) / r
    gx = roi[0] + c * (roi[2] - roi[0])
    gy = roi[1] + c * (roi[3] - roi[1])
    layer.roi = roi
    layer.grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 2)
    layer.box = rec["boxes"][b, q].float().cpu() * sxy.repeat(2)


def _scale_attention(cap: Capture) -> Tensor | None:
    """``[blocks, levels, 3]``: per block and level, the weights of the finer, same and
    coarser level's term in the order :class:`qdet.dynamic_detr.EncoderBlock` computes them
    (same level first, then the finer, then the coarser neighbour)."""
    if not cap.scale:
        return None
    out = []
    for block in cap.scale:
        n = block["levels"]
        t = torch.full((n, 3), float("nan"))
        it = iter(block["weights"])
        for lvl in range(n):
            roles = [1] + ([0] if lvl > 0 else []) + ([2] if lvl < n - 1 else [])
            for role in roles:
                t[lvl, role] = float(next(it)[0])
        out.append(t)
    return torch.stack(out)


def _encoder_attention(cap: Capture, xy, size) -> dict:
    if not cap.encoder or cap.map_mask is None:
        raise ValueError("--encoder needs a model with a DETR encoder (detr, conditional): "
                         "this model's encoder has no attention map of one position")
    mask = cap.map_mask[0]
    h, w = mask.shape
    x, y = xy
    if not (0 <= x < size[0] and 0 <= y < size[1]):
        raise ValueError(f"encoder position ({x:g}, {y:g}) is outside the image "
                         f"({size[0]}x{size[1]} pixels)")
    vh, vw = int((~mask[:, 0]).sum()), int((~mask[0]).sum())
    i, j = min(int(y / size[1] * vh), h - 1), min(int(x / size[0] * vw), w - 1)
    maps = []
    for rec in cap.encoder:
        mha = rec["module"]
        nh = mha.num_heads
        wq, wk, _ = mha.in_proj_weight.chunk(3)
        bq = bk = None
        if mha.in_proj_bias is not None:
            bq, bk, _ = mha.in_proj_bias.chunk(3)
        q = _heads(F.linear(rec["q"][0, [i * w + j]], wq, bq), nh)
        k = _heads(F.linear(rec["k"][0], wk, bk), nh)
        logits = q @ k.transpose(1, 2) * (mha.embed_dim // nh) ** -0.5
        pad = rec["pad"][0] if rec["pad"] is not None else None
        maps.append(masked_softmax(logits, pad)[:, 0].float().cpu().view(nh, h, w))
    return {"position": (float(x), float(y)), "cell": (i, j), "attention": torch.stack(maps)}


@torch.no_grad()
def explain(model: Detector, image, top: int = 3, queries: Sequence[int] | None = None,
            layers: int | Sequence[int] | None = None,
            encoder: tuple[float, float] | None = None) -> Explanations:
    """Where each of the ``top`` highest-scoring queries (or the given ``queries``) looks in
    ``image``, layer by layer (``layers``: indices, negative from the last; default all).

    ``image``: a PIL image or a path (resized and normalized as the model's evaluation
    input), or a normalized ``[3, H, W]`` tensor. ``encoder=(x, y)``: also the encoder
    self-attention of that pixel (DETR, Conditional DETR). Returns :class:`Explanations`,
    one :class:`ObjectExplanation` per object, best first. Runs one ordinary forward pass
    (eval mode) with recording hooks; works on the fast path, on CPU and GPU.
    """
    device = next(model.parameters()).device
    x, picture, size = _prepare(model, image)
    was_training = model.training
    model.eval()
    try:
        out, cap = capture(model, [x.to(device)])
    finally:
        model.train(was_training)
    if not cap.layers:
        raise ValueError(f"qdet.explain does not know the attention of {type(model).__name__}")
    per_layer = [*out.get("aux_outputs", []), out]
    probs = [class_probs(o["pred_logits"][0].float(), model.focal).cpu() for o in per_layer]
    boxes = [o["pred_boxes"][0].float().cpu() for o in per_layer]
    n_queries = probs[-1].shape[0]
    score, label = probs[-1].max(-1)
    if queries is None:
        picked = score.argsort(descending=True)[:top].tolist()
    else:
        picked = [int(q) for q in queries]
        bad = [q for q in picked if not 0 <= q < n_queries]
        if bad:
            raise ValueError(f"query {bad[0]} is out of range: the model has {n_queries} "
                             f"queries (0-{n_queries - 1})")
    n_layers = len(cap.layers)
    chosen = _pick_layers(layers, n_layers)
    kind = KIND[cap.layers[0]["kind"]]
    scale = torch.tensor(size, dtype=torch.float32)
    sxy = scale / torch.tensor([x.shape[-1], x.shape[-2]], dtype=torch.float32)
    anchors = None
    if cap.layers[0]["kind"] == "rcda":
        t = model.transformer
        anchors = t.anchors(device).repeat(t.cfg.num_patterns, 1).float().cpu()  # pattern-major
    objects = []
    for q in picked:
        lab = int(label[q])
        # as postprocess reports it: clipped to the image
        final = box_convert(boxes[-1][q][None], "cxcywh", "xyxy")[0].clamp(0, 1) * scale.repeat(2)
        explained = []
        for i in chosen:
            rec = cap.layers[i]
            layer = LayerExplanation(index=i)
            j = i - (n_layers - len(per_layer))        # per_layer may hold only the last layer
            if 0 <= j < len(per_layer):
                layer.score = float(probs[j][q, lab])
                layer.box = box_convert(boxes[j][q][None], "cxcywh", "xyxy")[0].clamp(0, 1) \
                    * scale.repeat(2)
            if rec["kind"] in ("mha", "conditional"):
                _map_layer(layer, rec, 0, q, final, size, cap)
            elif rec["kind"] == "rcda":
                _rcda_layer(layer, rec, 0, q, final, size,
                            None if anchors is None else anchors[q] * scale)
            elif rec["kind"] == "deform":
                _deform_layer(layer, rec, 0, q, final, size)
            else:
                _stage_layer(layer, rec, 0, q, sxy)
            explained.append(layer)
        objects.append(ObjectExplanation(q, lab, model.class_names[lab], float(score[q]),
                                         final, explained))
    enc = _encoder_attention(cap, encoder, size) if encoder is not None else None
    return Explanations(objects, arch=model.arch, kind=kind, image=picture, image_size=size,
                        num_layers=n_layers, class_names=list(model.class_names),
                        scale_attention=_scale_attention(cap), encoder=enc)


# --------------------------------------------------------------------------- as data


def _list(t: Tensor | None, digits: int = 4):
    if t is None:
        return None
    return [round(v, digits) for v in t.flatten().tolist()] if t.dim() <= 1 else \
        [_list(row, digits) for row in t]


def _peak(m: Tensor, size, valid_hw) -> list[float]:
    """Pixel centre of the largest cell of a [H, W] map."""
    h, w = m.shape
    xs, ys = _cell_centres(valid_hw, (h, w), size)
    i = int(m.argmax())
    return [round(float(xs[i % w]), 1), round(float(ys[i // w]), 1)]


def to_json(expl: Explanations) -> dict:
    """The explanation as plain data: the small arrays in full (boxes, points, weights, row
    and column profiles, reference points, RoI grids), each map as a summary (shape, peak
    pixel and maximum of its mean over heads)."""
    size = expl.image_size
    objects = []
    for obj in expl:
        layers = []
        for la in obj.layers:
            d = {"index": la.index, "box": _list(la.box, 1), "score": la.score,
                 "entropy": la.entropy, "in_box": la.in_box, "dominant": la.dominant,
                 "shares": la.shares, "agreement": la.agreement,
                 "reference": _list(la.reference, 1)}
            if la.attention is not None:
                mean = la.attention.mean(0)       # one image: its map has no padding
                d["attention"] = {"shape": list(la.attention.shape), "max": float(mean.max()),
                                  "peak": _peak(mean, size, mean.shape)}
                if la.terms is not None:
                    d["terms"] = {k: {"peak": _peak(v.mean(0), size, mean.shape)}
                                  for k, v in la.terms.items()}
            if la.row is not None:
                d["row"], d["col"] = _list(la.row), _list(la.col)
            if la.points is not None:
                d.update(points=_list(la.points, 1), weights=_list(la.weights),
                         levels=[list(s) for s in la.levels], level_weight=la.level_weight,
                         spread=la.spread)
            if la.roi is not None:
                d.update(roi=_list(la.roi, 1), roi_level=la.roi_level, grid=_list(la.grid, 1))
            layers.append({k: v for k, v in d.items() if v is not None})
        objects.append({"query": obj.query, "label": obj.label, "name": obj.name,
                        "score": obj.score, "box": _list(obj.box, 1), "layers": layers})
    out = {"arch": expl.arch, "kind": expl.kind, "image_size": list(size),
           "num_layers": expl.num_layers, "objects": objects}
    if expl.scale_attention is not None:
        out["scale_attention"] = [[[None if math.isnan(v) else round(v, 4) for v in lvl]
                                   for lvl in block.tolist()] for block in expl.scale_attention]
    if expl.encoder is not None:
        att = expl.encoder["attention"]
        out["encoder"] = {"position": list(expl.encoder["position"]),
                          "cell": list(expl.encoder["cell"]),
                          "layers": [{"peak": _peak(a.mean(0), size, a.shape[1:]),
                                      "max": float(a.mean(0).max())} for a in att]}
    return _finite(out)


def _finite(x):
    """NaN (a term of a constant logit row has no share) -> None, so the JSON is valid."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
