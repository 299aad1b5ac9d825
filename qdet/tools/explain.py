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

``qdet.explain`` is :func:`explain`; the recording hooks and the decompositions are in
``qdet.tools.explain_capture``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

from ..blocks.base import Detector, class_probs, model_device
from .explain_capture import (
    Capture,
    capture,
    conditional_terms,
    encoder_attention,
    masked_softmax,
    mha_terms,
    normalized_entropy,
    rcda_attention,
    variance_shares,
)

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


# --------------------------------------------------------------------------- explain


def _prepare(model: Detector, image):
    """(input tensor [3,h,w], PIL image to draw on, (W, H) of the image as given)."""
    from PIL import Image

    from ..data.images import denormalize_image, load_image
    from ..data.transforms import eval_transform

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
        return image, denormalize_image(image), (int(image.shape[-1]), int(image.shape[-2]))
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


def cell_centres(valid_hw: tuple[int, int], hw: tuple[int, int], size) -> tuple[Tensor,
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
    xs, ys = cell_centres((vh, vw), (h, w), size)
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
    from ..blocks.dynamic_head import roi_levels

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
    coarser level's term in the order :class:`qdet.models.dynamic_detr.EncoderBlock` computes them
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
    if not isinstance(model, Detector):
        raise ValueError(f"qdet.explain needs a PyTorch qdet model (it hooks its attention "
                         f"layers), not a {type(model).__name__}; for an ONNX file, explain "
                         "the checkpoint it was exported from")
    device = model_device(model)
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
    enc = encoder_attention(cap, encoder, size) if encoder is not None else None
    return Explanations(objects, arch=model.arch, kind=kind, image=picture, image_size=size,
                        num_layers=n_layers, class_names=list(model.class_names),
                        scale_attention=_scale_attention(cap), encoder=enc)
