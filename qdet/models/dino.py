"""DINO: DETR with Improved DeNoising Anchor Boxes (Zhang et al., ICLR 2023).
https://arxiv.org/abs/2203.03605

Deformable DETR with box refinement and two-stage queries (``deformable_detr``), plus three
things (paper Sec. 3):
- Contrastive denoising (Sec. 3.3): denoising groups hold a positive and a negative copy of
  every target box, the negatives noised further and trained to "no object"
  (``qdet.blocks.denoising`` with ``contrastive``, DINO's corner noise, and a budget of 100
  queries split into as many groups as the batch's most boxes allow).
- Mixed query selection (Sec. 3.4): the encoder's top-k proposals give the decoder its
  anchor boxes (detached), while the content queries stay learned (``tgt_embed``).
- Look forward twice (Sec. 3.5): each decoder layer's box is reported from the box of the
  layer before it without detaching it, so a layer's box loss also trains the refinement
  before it; the next layer's input is still detached.
The second and third are switches for the paper's ablation (``mixed_selection``,
``look_forward_twice``; the first is ``dn.contrastive``).
Every decoder layer computes its queries' positional part from its current anchor box:
the sine embedding of the box (x, y, w, h, 128 dimensions each) through an MLP
(``ref_point_head``). The final decoder norm applies to the outputs the heads read; the box
refinement inside the decoder reads the un-normed ones. Feature maps use a sine encoding of
temperature 20 without offset; boxes come out of inverse sigmoids clamped at 1e-3.

Defaults: the official ``config/DINO/DINO_4scale.py`` (R50, 4 levels from C3-C5 plus one,
900 queries, 6+6 layers, FFN 2048, dropout 0, focal loss: class cost 2 and weight 1, L1 5,
GIoU 2; top 300 detections at inference; 100 denoising queries, label noise ratio 0.5, box
noise 0.4). DINO flips a label with probability ratio x 0.5 to a random class, which may be
the same; ``dn.label_noise`` is the probability a label changes, so 0.25. The official
training scripts override the box noise to 1.0 (``--set dn.box_noise=1.0``). The 5-scale
model: ``num_feature_levels=5`` (C2-C5 plus one). Official checkpoints and detrex's
(separate heads, the feature encoding of temperature 10000 with offset -0.5) load through
``qdet.weights.official``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..blocks.base import MLP, Detector, LossConfig, MethodSpec, layer_outputs
from ..blocks.denoising import DNConfig, check_query_groups, dn_modules, plan_queries
from ..blocks.layers import (
    DeformableDecoderLayer,
    DeformableEncoder,
    encoder_proposals,
    flatten_levels,
    multiscale_features,
    multiscale_input,
)
from ..blocks.position_encoding import sine_embed_points
from ..ops.deform_attn import MSDeformAttn

EPS = 1e-3   # DINO's inverse sigmoid clamp


def _dino_loss() -> LossConfig:
    return LossConfig(class_cost=2.0, class_weight=1.0)


def _dino_dn() -> DNConfig:
    return DNConfig(queries=100, label_noise=0.25, box_noise=0.4, contrastive=True,
                    noise="corners")


@dataclass
class Config:
    """DINO-4scale R50 as in the official config."""
    num_classes: int = 91
    backbone: str = "resnet50"
    dilation: bool = False
    frozen_bn: bool = True
    backbone_trainable: int = 3
    num_feature_levels: int = 4      # 5: C2-C5 plus one (DINO-5scale)
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    num_select: int = 300            # detections kept per image at inference
    share_heads: bool = True         # one class and one box head for every decoder layer
    pe_temperature: float = 20.0     # the feature maps' sine encoding (detrex: 10000)
    pe_offset: float = 0.0           # (detrex: -0.5)
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=_dino_loss)
    dn: DNConfig = field(default_factory=_dino_dn)
    query_groups: int = 1
    # the paper's parts, switchable for its ablation (Table 5): False gives "pure query
    # selection" (content queries too from the selected encoder features, detached, as the
    # official code's embed_init_tgt=False) and a box loss that trains its own layer only
    mixed_selection: bool = True
    look_forward_twice: bool = True


def inverse_sigmoid(x: Tensor) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=EPS) / (1 - x).clamp(min=EPS))


class Decoder(nn.Module):
    """Deformable DETR's decoder layers under DINO's query positions and refinement."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels,
                                   cfg.nheads, cfg.dec_n_points) for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(d)
        self.ref_point_head = MLP(2 * d, d, d, 2)

    def forward(self, tgt, ref, memory, shapes, ratios, pad, bbox_embed, self_mask=None):
        """``ref [B,N,4]``: the anchor boxes. Returns every layer's normed output
        ``[L,B,N,d]`` and the boxes each layer started from ``[L,B,N,4]``: the first is
        ``ref``, then every layer's refined box, not detached (look forward twice)."""
        d = tgt.shape[-1]
        hs, starts = [], [ref]
        for i, layer in enumerate(self.layers):
            ref_in = ref[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]   # [B,N,L,4]
            query_pos = self.ref_point_head(sine_embed_points(ref_in[:, :, 0], d // 2))
            tgt = layer(tgt, query_pos, ref_in, memory, shapes, pad, self_mask)
            new = (bbox_embed[i](tgt) + inverse_sigmoid(ref)).sigmoid()
            hs.append(self.norm(tgt))
            starts.append(new)
            ref = new.detach()
        return torch.stack(hs), torch.stack(starts[:-1])


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.encoder = DeformableEncoder(d, cfg.dim_feedforward, cfg.dropout,
                                         cfg.num_feature_levels, cfg.nheads, cfg.enc_n_points,
                                         cfg.enc_layers)
        self.decoder = Decoder(cfg)
        self.tgt_embed = nn.Embedding(cfg.num_queries * cfg.query_groups, d) \
            if cfg.mixed_selection else None
        self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        if self.tgt_embed is not None:
            nn.init.normal_(self.tgt_embed.weight)
        # the encoder proposals' own heads (not the decoder's)
        self.enc_out_class_embed = nn.Linear(d, cfg.num_classes)
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)

    def forward(self, srcs, masks, pos, bbox_embed, groups=1, prefix=None, self_mask=None):
        """Returns the decoder's outputs and starting boxes and the selected proposals'
        own predictions (``enc_outputs``). ``groups`` query groups (group g takes the
        proposals ranked g*k to (g+1)*k-1) after ``prefix`` (content, noised boxes)."""
        cfg = self.cfg
        src, pad, pos, shapes, ratios = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder(src, pos, shapes, ratios, pad)
        b = memory.shape[0]
        props, out_mem = encoder_proposals(memory, pad, shapes)
        out_mem = self.enc_output_norm(self.enc_output(out_mem))
        enc_logits = self.enc_out_class_embed(out_mem)
        enc_coords = self.enc_out_bbox_embed(out_mem) + props                 # logit space
        k = cfg.num_queries * groups
        top = enc_logits.max(-1).values.topk(k, dim=1).indices
        coords = torch.gather(enc_coords, 1, top[..., None].expand(-1, -1, 4))
        chosen = torch.gather(out_mem, 1, top[..., None].expand(-1, -1, out_mem.shape[-1]))
        enc = {"pred_logits": self.enc_out_class_embed(chosen), "pred_boxes": coords.sigmoid()}
        ref = coords.detach().sigmoid()          # mixed query selection: anchors from here,
        if self.tgt_embed is not None:           # content learned
            tgt = self.tgt_embed.weight[None, :k].expand(b, -1, -1)
        else:                                    # pure: content selected too
            tgt = chosen.detach()
        if prefix is not None:
            content, boxes = prefix
            tgt = torch.cat([content.to(tgt.dtype), tgt], 1)
            ref = torch.cat([boxes.to(ref.dtype), ref], 1)
        hs, starts = self.decoder(tgt, ref, memory, shapes, ratios, pad, bbox_embed, self_mask)
        return hs, starts, enc


class DINO(Detector):
    arch = "dino"
    title = "DINO"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_query_groups(cfg.query_groups)
        d = cfg.d_model
        backbone_levels = min(cfg.num_feature_levels - 1, 4) if cfg.num_feature_levels > 3 \
            else cfg.num_feature_levels
        self.backbone, self.input_proj = multiscale_input(
            cfg.backbone, cfg.dilation, cfg.frozen_bn, cfg.backbone_trainable, d,
            cfg.num_feature_levels, backbone_levels)
        self.transformer = Transformer(cfg)
        class_head, box_head = nn.Linear(d, cfg.num_classes), MLP(d, d, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior prob 0.01
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        if cfg.share_heads:   # one module under every layer's name, as the official code
            self.class_embed = nn.ModuleList([class_head] * cfg.dec_layers)
            self.bbox_embed = nn.ModuleList([box_head] * cfg.dec_layers)
        else:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head)
                                             for _ in range(cfg.dec_layers))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head)
                                            for _ in range(cfg.dec_layers))
        # the encoder proposals' heads start as copies of the decoder's (official init)
        self.transformer.enc_out_class_embed.load_state_dict(class_head.state_dict())
        self.transformer.enc_out_bbox_embed.load_state_dict(box_head.state_dict())
        self.dn_label = dn_modules(cfg.dn, cfg.num_classes, d)
        self.max_detections = cfg.num_select

    def class_heads(self) -> dict[str, str]:
        return {**{f"class_embed.{i}": "classes" for i in range(len(self.class_embed))},
                "transformer.enc_out_class_embed": "classes"}

    def forward(self, images, targets: list[dict] | None = None) -> dict:
        cfg = self.config
        srcs, masks, pos = multiscale_features(self.backbone, self.input_proj, images,
                                               cfg.d_model, cfg.pe_temperature, cfg.pe_offset)
        plan = plan_queries(self, targets)
        prefix = None
        if plan.dn is not None:
            prefix = (self.dn_label(plan.dn.labels), plan.dn.boxes)
        hs, starts, enc = self.transformer(srcs, masks, pos, self.bbox_embed, plan.groups,
                                           prefix, plan.mask)
        logits = torch.stack([self.class_embed[i](h) for i, h in enumerate(hs)])
        if not cfg.look_forward_twice:    # each layer's box loss trains that layer only
            starts = starts.detach()
        boxes = torch.stack([(self.bbox_embed[i](h) + inverse_sigmoid(r)).sigmoid()
                             for i, (h, r) in enumerate(zip(hs, starts))])
        out = {**layer_outputs(logits, boxes, cfg.aux_loss), "enc_outputs": enc}
        return plan.finish(out, self.dn_label)


SPEC = MethodSpec(Config, DINO)
