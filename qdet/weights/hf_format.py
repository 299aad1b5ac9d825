"""Hugging Face transformers checkpoints: a model folder (``config.json`` + weights) of
``DetrForObjectDetection``, ``ConditionalDetrForObjectDetection`` or
``DeformableDetrForObjectDetection`` (plain, box refinement, two-stage) read as qdet.

HF's names are mapped onto the official repositories' layout, and ``qdet.weights.official`` reads
that, so one converter per method infers the sizes from tensor shapes; ``config.json`` adds
what shapes cannot tell (attention heads, dilation, the two-stage proposal count) and the
class names (``id2label``). Both HF backbone flavours are read: timm's ResNet (the names of
torchvision's) and HF's own ``ResNetModel`` (``embedder``/``encoder.stages``).

Two generations of HF names exist: the files on the Hub and what ``save_pretrained``
writes (``backbone.conv_encoder``, ``out_proj``, ``fc1``, Conditional DETR's ``sa_*``/``ca_*``
projections) and the module names of transformers 5 in memory (``backbone.model``,
``o_proj``, ``mlp.fc1``, ``self_attn.q_content_proj``). :func:`canonical_names` turns the
second into the first, so both load. Matcher and loss weights are qdet's paper defaults,
not HF's (HF's Deformable DETR defaults differ from the paper's).
"""
from __future__ import annotations

import re

import torch

from ..blocks.backbone import RESNETS
from .official import read_official

# HF model_type -> qdet architecture
HF_ARCHS = {"detr": "detr", "conditional_detr": "conditional", "deformable_detr": "deformable"}


class HFFormatError(ValueError):
    """A model folder qdet cannot convert; the message says why and what would work."""


# ------------------------------------------------------------------- names, generation 5 -> 4

_V5_TO_HUB = [
    (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
    (r"\.o_proj\.", ".out_proj."),
    (r"(layers\.\d+)\.mlp\.(fc[12])\.", r"\1.\2."),
    (r"(decoder\.layers\.\d+)\.self_attn\.(q|k)_(content|pos)_proj\.", r"\1.sa_\2\3_proj."),
    (r"(decoder\.layers\.\d+)\.encoder_attn\.(q|k)_(content|pos)_proj\.", r"\1.ca_\2\3_proj."),
    (r"(decoder\.layers\.\d+)\.encoder_attn\.q_pos_sine_proj\.", r"\1.ca_qpos_sine_proj."),
]


def canonical_names(sd: dict, model_type: str) -> dict:
    """A state dict in the names of the Hub files, whichever generation it came in."""
    conditional = model_type == "conditional_detr"
    out = {}
    for k, v in sd.items():
        for pattern, new in _V5_TO_HUB:
            k = re.sub(pattern, new, k)
        if conditional:  # transformers 5 moved Conditional DETR's decoder values, too
            k = re.sub(r"(decoder\.layers\.\d+)\.self_attn\.v_proj\.", r"\1.sa_v_proj.", k)
            k = re.sub(r"(decoder\.layers\.\d+)\.encoder_attn\.v_proj\.", r"\1.ca_v_proj.", k)
        out[k] = v
    return out


# ------------------------------------------------------------------- HF -> official names

_BACKBONE = "model.backbone.conv_encoder.model."


def backbone_key(k: str) -> str:
    """An HF backbone key -> torchvision's name under ``backbone.0.body.``: timm's ResNet
    already uses torchvision's names; HF's ResNetModel is renamed."""
    k = "backbone.0.body." + k[len(_BACKBONE):]
    k = k.replace("embedder.embedder.convolution", "conv1")
    k = k.replace("embedder.embedder.normalization", "bn1")
    k = re.sub(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.",
               lambda m: f"layer{int(m.group(1)) + 1}.{m.group(2)}.", k)
    k = re.sub(r"layer\.(\d+)\.convolution", lambda m: f"conv{int(m.group(1)) + 1}", k)
    k = re.sub(r"layer\.(\d+)\.normalization", lambda m: f"bn{int(m.group(1)) + 1}", k)
    return k.replace("shortcut.convolution", "downsample.0").replace(
        "shortcut.normalization", "downsample.1")


# per-layer HF names -> the official nn.TransformerEncoderLayer-style names
ENCODER_NAMES = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
                 "fc1": "linear1", "fc2": "linear2"}
DECODER_NAMES = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2",
                 "final_layer_norm": "norm3", "fc1": "linear1", "fc2": "linear2",
                 "encoder_attn": "multihead_attn"}
CONDITIONAL_DECODER_NAMES = {**DECODER_NAMES, "encoder_attn": "cross_attn"}
# Deformable DETR's official decoder layer numbers its norms in another order
DEFORMABLE_DECODER_NAMES = {"encoder_attn_layer_norm": "norm1", "self_attn_layer_norm": "norm2",
                            "final_layer_norm": "norm3", "fc1": "linear1", "fc2": "linear2",
                            "encoder_attn": "cross_attn"}
_LAYER = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.*)")
# the q/k/v projections that official code keeps stacked as nn.MultiheadAttention's in_proj
_QKV = re.compile(r"(self_attn|encoder_attn)\.(q|k|v|out)_proj\.(weight|bias)$")


def rename_start(name: str, table: dict) -> str:
    """``name`` with its leading module renamed by ``table`` (unchanged when none applies)."""
    for old, new in table.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def _layer_keys(sd: dict, key: str, rest: str, stacked: set[str], names: dict) -> dict:
    """One HF encoder/decoder layer tensor -> {official name under the layer: tensor};
    q/k/v of the attentions in ``stacked`` become one in_proj (k and v map to nothing)."""
    m = _QKV.match(rest)
    if m and m.group(1) in stacked:
        attn, which, kind = m.groups()
        target = names.get(attn, attn)
        if which == "out":
            return {f"{target}.out_proj.{kind}": sd[key]}
        if which == "q":
            prefix = key[:len(key) - len(rest)] + attn
            return {f"{target}.in_proj_{kind}": torch.cat(
                [sd[f"{prefix}.{w}_proj.{kind}"] for w in "qkv"])}
        return {}
    return {rename_start(rest, names): sd[key]}


def _top_key(k: str, arch: str) -> str:
    """Names outside the backbone and the layers."""
    if arch == "deformable":
        k = re.sub(r"^model\.(level_embed|reference_points|enc_output_norm|enc_output|"
                   r"pos_trans_norm|pos_trans)", r"transformer.\1", k)
        return k.replace("model.query_position_embeddings", "query_embed").replace(
            "model.input_proj", "input_proj")
    return (k.replace("model.query_position_embeddings", "query_embed")
             .replace("model.input_projection", "input_proj")
             .replace("model.decoder.layernorm", "transformer.decoder.norm")
             .replace("model.decoder.", "transformer.decoder.")
             .replace("class_labels_classifier", "class_embed")
             .replace("bbox_predictor", "bbox_embed"))


def _deformable_heads(sd: dict, n_pred: int, refine: bool, source: str) -> dict:
    """The official per-prediction heads ``class_embed.i``/``bbox_embed.i`` (and, with box
    refinement, the decoder's aliases the official checkpoints carry). HF saves tied heads
    once: the top-level ``.i`` or the decoder's copy, else head 0 (a head shared by all)."""
    def find(head: str, i: int):
        for prefix in (f"{head}.{i}.", f"model.decoder.{head}.{i}."):
            names = [k[len(prefix):] for k in sd if k.startswith(prefix)]
            if names:
                return prefix, names
        return None

    out = {}
    for head in ("class_embed", "bbox_embed"):
        for i in range(n_pred):
            found = find(head, i) or find(head, 0)
            if found is None:
                raise HFFormatError(f"{source}: no {head} weights in the model file")
            prefix, names = found
            for name in names:
                out[f"{head}.{i}.{name}"] = sd[prefix + name]
                if head == "bbox_embed" and refine:
                    out[f"transformer.decoder.{head}.{i}.{name}"] = sd[prefix + name]
    return out


def hf_to_official(sd: dict, model_type: str, config: dict | None = None,
                   source: str = "HF model") -> dict:
    """An HF state dict (either generation of names) -> the official repository's names."""
    config = config or {}
    arch = HF_ARCHS[model_type]
    sd = canonical_names(sd, model_type)
    decoder = {"detr": DECODER_NAMES, "conditional": CONDITIONAL_DECODER_NAMES,
               "deformable": DEFORMABLE_DECODER_NAMES}[arch]
    # which attentions are nn.MultiheadAttention (q/k/v stacked) in the official code
    stacked = {"encoder": {"detr": {"self_attn"}, "conditional": {"self_attn"},
                           "deformable": set()}[arch],
               "decoder": {"detr": {"self_attn", "encoder_attn"}, "conditional": set(),
                           "deformable": {"self_attn"}}[arch]}
    out = {}
    for k, v in sd.items():
        if k.startswith(_BACKBONE):
            out[backbone_key(k)] = v
        elif m := _LAYER.match(k):
            part, i, rest = m.groups()
            names = ENCODER_NAMES if part == "encoder" else decoder
            if arch == "conditional" and part == "decoder" and re.match(r"(sa|ca)_", rest):
                names = {}
            prefix = f"transformer.{part}.layers.{i}."
            for name, t in _layer_keys(sd, k, rest, stacked[part], names).items():
                out[prefix + name] = t
        elif arch == "deformable" and re.match(r"(model\.decoder\.)?(class|bbox)_embed\.", k):
            continue  # below, once per prediction
        else:
            out[_top_key(k, arch)] = v
    if arch == "deformable":
        layers = int(config.get("decoder_layers") or 1 + max(
            int(m.group(1)) for k in sd if (m := re.match(r"model\.decoder\.layers\.(\d+)", k))))
        two_stage = "model.enc_output.weight" in sd
        refine = bool(config.get("with_box_refine", two_stage)) or any(
            k.startswith("model.decoder.bbox_embed.") for k in sd)
        out.update(_deformable_heads(sd, layers + two_stage, refine, source))
    return out


# ------------------------------------------------------------------------ config.json


def _backbone(config: dict, source: str) -> tuple[str, bool]:
    """(flavour "timm" | "hf-resnet", dilation) of an HF config, refusing what qdet's
    torchvision ResNets cannot reproduce."""
    bb = config.get("backbone_config")
    if bb is None:  # the Hub's older configs: a timm backbone named by "backbone"
        if not config.get("use_timm_backbone", True):
            raise HFFormatError(f"{source}: config.json names no backbone")
        bb = {"model_type": "timm_backbone", "backbone": config.get("backbone", "resnet50")}
    if bb.get("model_type") == "timm_backbone":
        name = bb.get("backbone", "resnet50")
        if name not in RESNETS:
            raise HFFormatError(f"{source}: timm backbone {name!r} is not one qdet builds "
                                f"(torchvision-layout {', '.join(RESNETS)})")
        return "timm", bool(config.get("dilation")) or bb.get("output_stride") == 16
    if bb.get("model_type") == "resnet":
        if bb.get("downsample_in_bottleneck") or bb.get("downsample_in_first_stage"):
            raise HFFormatError(f"{source}: this HF ResNet strides where torchvision's does "
                                "not (downsample_in_bottleneck / downsample_in_first_stage)")
        return "hf-resnet", False   # HF's ResNet cannot be dilated
    raise HFFormatError(f"{source}: backbone {bb.get('model_type')!r} is not a ResNet; qdet "
                        f"converts ResNet backbones ({', '.join(RESNETS)})")


def hf_arch(config: dict, source: str) -> str:
    """The qdet architecture of an HF ``config.json``, or a one-line error listing those
    qdet converts."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in HF_ARCHS or any(a.endswith("ForSegmentation") for a in archs):
        kind = " / ".join(archs) or model_type
        raise HFFormatError(
            f"{source}: HF model type {kind!r} is not one qdet converts; it converts "
            f"{', '.join(HF_ARCHS)} (DetrForObjectDetection, ConditionalDetrForObjectDetection, "
            "DeformableDetrForObjectDetection)")
    return HF_ARCHS[model_type]


def official_args(config: dict, source: str) -> dict:
    """What the official converters take from a checkpoint's ``args``, from config.json."""
    heads = {config.get("encoder_attention_heads", 8), config.get("decoder_attention_heads", 8)}
    if len(heads) != 1:
        raise HFFormatError(f"{source}: encoder and decoder attention heads differ {heads}; "
                            "qdet's models use one count")
    if config.get("activation_function", "relu") != "relu":
        raise HFFormatError(f"{source}: activation {config['activation_function']!r}; the "
                            "DETR family qdet implements uses relu")
    if config.get("position_embedding_type", "sine") != "sine":
        raise HFFormatError(f"{source}: learned position embeddings; qdet implements the "
                            "sine encoding of the released models")
    _, dilation = _backbone(config, source)
    queries = config.get("num_queries", 300)
    if config.get("two_stage"):  # HF keeps the proposal count apart from num_queries
        queries = config.get("two_stage_num_proposals", queries)
    return {"nheads": heads.pop(), "dilation": dilation, "num_queries": queries}


def class_labels(config: dict, num_classes: int) -> tuple[list[int], list[str]]:
    """Category ids and names of an HF model's labels from ``id2label``: label i is
    category i (for the COCO models on the Hub, COCO's category id itself)."""
    names = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    return list(range(num_classes)), [names.get(i, str(i)) for i in range(num_classes)]


def read_hf(config: dict, sd: dict, source: str):
    """An HF config.json dict and state dict -> ``(arch, Config, qdet state dict,
    category ids, class names)``."""
    arch = hf_arch(config, source)
    args = official_args(config, source)
    if any(k.startswith("detr.") for k in sd):
        raise HFFormatError(f"{source}: a DETR segmentation model; qdet loads detection models")
    official = hf_to_official(sd, config["model_type"], config, source)
    try:
        got, cfg, state = read_official(official, args)
    except (KeyError, ValueError) as e:
        raise HFFormatError(f"{source}: the weights do not fit {config['model_type']}'s "
                            f"layout ({e})") from None
    if got != arch:
        raise HFFormatError(f"{source}: config.json says {config['model_type']} but the "
                            f"weights are laid out as {got}")
    ids, names = class_labels(config, cfg.num_classes)
    return arch, cfg, state, ids, names
