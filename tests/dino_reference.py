"""DINO's inference written again from the official repository's description, as plain
functions over a state dict in the official layout (IDEA-Research/DINO key names), to test
qdet's DINO against something it does not share code with (no pip-installable DINO
exists: HF transformers has none). It follows the official code's structure: sequence-first
decoder, its sine embeddings, its proposal generation and its head order; the one shared
piece is the deformable-attention core, the grid_sample reference
(``qdet.ops.deform_attn.ms_deform_attn_torch``, itself tested against the official
formulation). Eval mode, one image size per batch (no padding)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from qdet.ops.deform_attn import ms_deform_attn_torch


def linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def mlp(sd, name, x, n):
    for i in range(n):
        x = linear(sd, f"{name}.layers.{i}", x)
        if i < n - 1:
            x = F.relu(x)
    return x


def layer_norm(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def backbone(sd, x, depth: str, stages):
    net = getattr(torchvision.models, depth)(weights=None, norm_layer=FrozenBatchNorm2d)
    body = {k[len("backbone.0.body."):]: v for k, v in sd.items()
            if k.startswith("backbone.0.body.")}
    net.load_state_dict(body, strict=False)
    net.to(x.dtype)
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for i in range(1, 5):
        x = getattr(net, f"layer{i}")(x)
        if i in stages:
            out.append(x)
    return out


def sine_hw(h, w, num_feats, temperature):
    """PositionEmbeddingSineHW on an unpadded map: (1, 2*num_feats, h, w)."""
    ones = torch.ones(1, h, w)
    y, x = ones.cumsum(1), ones.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = temperature ** (2 * (torch.arange(num_feats) // 2) / num_feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), 4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), 4).flatten(3)
    return torch.cat((py, px), 3).permute(0, 3, 1, 2)


def sine_box(pos, d):
    """gen_sineembed_for_position of (n, b, 4) boxes: (n, b, 2*d), order y, x, w, h."""
    half = d // 2
    dim_t = 10000 ** (2 * (torch.arange(half) // 2) / half)
    parts = []
    for c in (1, 0, 2, 3):
        p = pos[:, :, c][..., None] * 2 * math.pi / dim_t
        parts.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), 3).flatten(2))
    return torch.cat(parts, 2)


def msda(sd, name, query, ref, value, shapes, heads, levels, points):
    """MSDeformAttn, batch-first query (b, q, d), ref (b, q, L, 2|4)."""
    b, q, d = query.shape
    v = linear(sd, f"{name}.value_proj", value).view(b, value.shape[1], heads, d // heads)
    off = linear(sd, f"{name}.sampling_offsets", query).view(b, q, heads, levels, points, 2)
    att = linear(sd, f"{name}.attention_weights", query).view(b, q, heads, levels * points)
    att = att.softmax(-1).view(b, q, heads, levels, points)
    if ref.shape[-1] == 2:
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / points * ref[:, :, None, :, None, 2:] * 0.5
    return linear(sd, f"{name}.output_proj", ms_deform_attn_torch(v, shapes, loc, att))


def inverse_sigmoid(x, eps=1e-3):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


@torch.no_grad()
def dino_forward(sd, images, *, heads=8, points=4, depth="resnet50", temperature=20.0):
    """(pred_logits, pred_boxes) of the last layer for images (b, 3, h, w)."""
    levels, d = sd["transformer.level_embed"].shape
    n_proj = sum(1 for k in sd if k.startswith("input_proj.") and k.endswith(".0.weight"))
    from_backbone = sum(1 for i in range(n_proj) if sd[f"input_proj.{i}.0.weight"].shape[-1] == 1)
    feats = backbone(sd, images, depth, list(range(5 - from_backbone, 5)))
    srcs = []
    for i in range(levels):
        x = feats[i] if i < from_backbone else (feats[-1] if i == from_backbone else srcs[-1])
        conv = sd[f"input_proj.{i}.0.weight"]
        x = F.conv2d(x, conv, sd[f"input_proj.{i}.0.bias"], stride=1 if conv.shape[-1] == 1
                     else 2, padding=0 if conv.shape[-1] == 1 else 1)
        srcs.append(F.group_norm(x, 32, sd[f"input_proj.{i}.1.weight"],
                                 sd[f"input_proj.{i}.1.bias"]))
    b = images.shape[0]
    shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pos = torch.cat([sine_hw(h, w, d // 2, temperature).flatten(2).transpose(1, 2)
                     + sd["transformer.level_embed"][i] for i, (h, w) in enumerate(shapes)], 1)
    # encoder: every pixel's centre, unpadded
    refs, dt = [], images.dtype      # (the official code counts in float32 whatever the dtype)
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dt) / h,
                                torch.linspace(0.5, w - 0.5, w, dtype=dt) / w, indexing="ij")
        refs.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    ref = torch.cat(refs)[None, :, None].expand(b, -1, levels, 2)
    memory = src
    n_enc = len({k.split(".")[3] for k in sd if k.startswith("transformer.encoder.layers.")})
    for i in range(n_enc):
        p = f"transformer.encoder.layers.{i}"
        memory = layer_norm(sd, f"{p}.norm1", memory + msda(
            sd, f"{p}.self_attn", memory + pos, ref, memory, shapes, heads, levels, points))
        ffn = linear(sd, f"{p}.linear2", F.relu(linear(sd, f"{p}.linear1", memory)))
        memory = layer_norm(sd, f"{p}.norm2", memory + ffn)
    # proposals: a box per position, side 0.05 * 2^level, in logit space
    props = []
    for lvl, (h, w) in enumerate(shapes):
        gy, gx = torch.meshgrid(torch.arange(h, dtype=dt) + 0.5,
                                torch.arange(w, dtype=dt) + 0.5, indexing="ij")
        grid = torch.stack((gx / w, gy / h), -1).reshape(-1, 2)
        props.append(torch.cat((grid, torch.full_like(grid, 0.05 * 2 ** lvl)), -1))
    props = torch.cat(props)[None].expand(b, -1, 4)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props)).masked_fill(~valid, float("inf"))
    out_mem = layer_norm(sd, "transformer.enc_output_norm",
                         linear(sd, "transformer.enc_output", memory.masked_fill(~valid, 0.0)))
    enc_logits = linear(sd, "transformer.enc_out_class_embed", out_mem)
    enc_coord = mlp(sd, "transformer.enc_out_bbox_embed", out_mem, 3) + props
    nq = sd["transformer.tgt_embed.weight"].shape[0]
    top = enc_logits.max(-1)[0].topk(nq, dim=1)[1]
    refpoint = torch.gather(enc_coord, 1, top[..., None].repeat(1, 1, 4))
    # decoder, sequence-first as the official code
    tgt = sd["transformer.tgt_embed.weight"][:, None].repeat(1, b, 1)             # (nq, b, d)
    reference = refpoint.sigmoid().transpose(0, 1)                                 # (nq, b, 4)
    mem_b = memory
    n_dec = len({k.split(".")[3] for k in sd if k.startswith("transformer.decoder.layers.")})
    hs, references = [], [reference]
    for i in range(n_dec):
        p = f"transformer.decoder.layers.{i}"
        ref_in = reference[:, :, None]                        # valid ratios are 1
        query_pos = mlp(sd, "transformer.decoder.ref_point_head", sine_box(ref_in[:, :, 0], d), 2)
        q = k = tgt + query_pos
        sa = F.multi_head_attention_forward(
            q, k, tgt, d, heads, sd[f"{p}.self_attn.in_proj_weight"],
            sd[f"{p}.self_attn.in_proj_bias"], None, None, False, 0.0,
            sd[f"{p}.self_attn.out_proj.weight"], sd[f"{p}.self_attn.out_proj.bias"],
            training=False, need_weights=False)[0]
        tgt = layer_norm(sd, f"{p}.norm2", tgt + sa)
        ca = msda(sd, f"{p}.cross_attn", (tgt + query_pos).transpose(0, 1),
                  ref_in.transpose(0, 1).expand(b, nq, levels, 4), mem_b, shapes, heads,
                  levels, points)
        tgt = layer_norm(sd, f"{p}.norm1", tgt + ca.transpose(0, 1))
        ffn = linear(sd, f"{p}.linear2", F.relu(linear(sd, f"{p}.linear1", tgt)))
        tgt = layer_norm(sd, f"{p}.norm3", tgt + ffn)
        new = (mlp(sd, f"transformer.decoder.bbox_embed.{i}", tgt, 3)
               + inverse_sigmoid(reference)).sigmoid()
        reference = new.detach()
        references.append(new)
        hs.append(layer_norm(sd, "transformer.decoder.norm", tgt))
    last = n_dec - 1
    h = hs[last].transpose(0, 1)
    logits = linear(sd, f"class_embed.{last}", h)
    boxes = (mlp(sd, f"bbox_embed.{last}", h, 3)
             + inverse_sigmoid(references[last].transpose(0, 1))).sigmoid()
    return logits, boxes
