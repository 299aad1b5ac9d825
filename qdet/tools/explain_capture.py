"""What ``qdet.explain`` records during one forward pass, and the decompositions it computes
from it.

:class:`Capture` puts forward hooks on the attention layers of every method and records what
each received. Arguments are read by name (``inspect.signature(...).bind``), never by
position, and every name a probe reads is checked against the hooked ``forward``'s signature
before the pass: a method file that renames an argument makes ``qdet explain`` fail at once
with the class and the name, instead of reading the wrong tensor (:func:`probes` lists
them).
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DETR_TERMS = ("cq·ck", "cq·pk", "pq·ck", "pq·pk")
CONDITIONAL_TERMS = ("content", "spatial")


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def named(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of ``module.forward(*args, **kwargs)`` by name, defaults filled in."""
    bound = _signature(type(module)).bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def probes() -> dict[type, tuple[str, ...]]:
    """Per hooked class, the ``forward`` arguments :class:`Capture` reads by name."""
    from ..blocks.dynamic_head import RCNNHead
    from ..blocks.layers import DeformableDecoder
    from ..models import anchor_detr, conditional_detr, detr, dino
    from ..models.dynamic_detr import EncoderBlock
    from ..ops.deform_attn import MSDeformAttn

    return {
        dino.Decoder: ("ratios",),
        detr.Transformer: ("mask",), conditional_detr.Transformer: ("mask",),
        detr.DecoderLayer: ("query_pos", "pos"),
        nn.MultiheadAttention: ("query", "key", "value", "key_padding_mask"),
        anchor_detr.DecoderLayer: ("qpos", "mem", "pad", "pos_2d"),
        anchor_detr.RCDA: ("q_row", "q_col", "k_row", "k_col", "value", "pad"),
        conditional_detr.Attention: ("q", "k", "v", "pad"),
        DeformableDecoder: ("valid_ratios",),
        MSDeformAttn: ("query", "reference_points", "shapes"),
        RCNNHead: ("features", "boxes"),
        EncoderBlock: ("feats",),
    }


def check_probes() -> None:
    """Raise ValueError naming the class and argument when a hooked ``forward`` lacks a
    name a probe reads (a renamed argument in a method file)."""
    for cls, names in probes().items():
        have = _signature(cls).parameters
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(f"qdet.explain reads {cls.__module__}.{cls.__qualname__}.forward's "
                             f"argument(s) {missing}, which it no longer has (renamed?); "
                             "update qdet/tools/explain_capture.py with the new names")


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
        from ..blocks.dynamic_head import RCNNHead
        from ..blocks.layers import DeformableDecoder, DeformableDecoderLayer, DETREncoderLayer
        from ..models import anchor_detr, conditional_detr, detr, dino
        from ..models.dynamic_detr import EncoderBlock

        check_probes()
        pre = self._pre
        for m in self.model.modules():
            if isinstance(m, (detr.Transformer, conditional_detr.Transformer)):
                pre(m, lambda a: setattr(self, "map_mask", a["mask"]))
            elif isinstance(m, detr.DecoderLayer):
                pre(m, lambda a: self._pending.update(p_q=a["query_pos"], p_k=a["pos"],
                                                      map_mask=None))
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
                pre(m, lambda a: setattr(self, "ratios", a["valid_ratios"]))
            elif isinstance(m, dino.Decoder):
                pre(m, lambda a: setattr(self, "ratios", a["ratios"]))
            elif isinstance(m, DeformableDecoderLayer):
                pre(m.cross_attn, self._deform)
            elif isinstance(m, RCNNHead):
                self._handles.append(m.register_forward_hook(self._stage, with_kwargs=True))
            elif isinstance(m, DETREncoderLayer):
                pre(m.self_attn, self._encoder)
            elif isinstance(m, EncoderBlock):
                pre(m, lambda a: self.scale.append({"levels": len(a["feats"]), "weights": []}))
                self._handles.append(m.scale_attn.register_forward_hook(
                    lambda mod, a, out: self.scale[-1]["weights"].append(out.flatten(1)[:, 0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module, fn) -> None:
        """A forward pre-hook calling ``fn(arguments by name)`` with
        ``self._current_module`` set to the module it fires for."""
        def hook(mod, args, kwargs):
            self._current_module = mod
            fn(named(mod, args, kwargs))
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    # --- per attention kind: what the layer received
    def _anchor_standard_layer(self, a):
        mem, pos_2d = a["mem"], a["pos_2d"]
        b, h, w, d = mem.shape
        self._pending.update(p_q=a["qpos"], p_k=pos_2d.reshape(b, h * w, d), map_mask=a["pad"])

    def _mha(self, a):
        # nn.MultiheadAttention(query, key, value, key_padding_mask=...); the enclosing
        # layer's pre-hook has just stored the positional parts p_q and p_k
        self.layers.append({"kind": "mha", "module": self._current_module, "q": a["query"],
                            "k": a["key"], "v": a["value"], "pad": a["key_padding_mask"],
                            **self._pending})
        self._pending = {}

    def _conditional(self, a):
        self.layers.append({"kind": "conditional", "module": self._current_module,
                            "q": a["q"], "k": a["k"], "v": a["v"], "pad": a["pad"]})

    def _rcda(self, a):
        names = ("q_row", "q_col", "k_row", "k_col", "value", "pad")
        self.layers.append({"kind": "rcda", "module": self._current_module,
                            **{n: a[n] for n in names}})

    def _deform(self, a):
        mod = self._current_module
        query, ref, shapes = a["query"], a["reference_points"], a["shapes"]
        loc, weights = mod.sampling(query, ref, shapes)
        self.layers.append({"kind": "deform", "module": mod, "loc": loc, "weights": weights,
                            "ref": ref, "shapes": [tuple(int(v) for v in s) for s in shapes],
                            "ratios": self.ratios})

    def _stage(self, mod, args, kwargs, out):
        a = named(mod, args, kwargs)
        self.layers.append({"kind": "stage", "roi": a["boxes"], "boxes": out[1],
                            "first_level": mod.first_level, "num_levels": len(a["features"]),
                            "resolution": mod.resolution})

    def _encoder(self, a):
        self.encoder.append({"module": self._current_module, "q": a["query"], "k": a["key"],
                             "pad": a["key_padding_mask"]})


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
    weights as :class:`qdet.models.anchor_detr.RCDA` computes them."""
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


def encoder_attention(cap: Capture, xy, size) -> dict:
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
