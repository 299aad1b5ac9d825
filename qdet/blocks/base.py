"""The model contract every qdet detector follows, and the few layers all of them use.

Every model subclasses :class:`Detector`. Its ``forward`` takes a normalized float tensor
``[B,3,H,W]`` or a list of ``[3,H,W]`` tensors of different sizes, and returns a dict:

- ``pred_logits`` ``[B,Q,C+1]`` (softmax models, last class = no object) or ``[B,Q,C]``
  (sigmoid focal models),
- ``pred_boxes`` ``[B,Q,4]``, normalized (cx, cy, w, h) relative to each image's own size
  (padding excluded),
- ``aux_outputs``: a list of such dicts, one per earlier decoder layer, when enabled,
- ``enc_outputs``: one such dict for a supervised encoder (two-stage models), when present.

In training mode with targets (``model(images, targets)``), a model configured with query
groups or denoising (``qdet.blocks.denoising``) returns every group's queries, group g at
``[:, g*Q:(g+1)*Q]`` (and ``query_groups``: K), and its denoising queries' outputs under
``dn``; otherwise exactly the Q queries above.

Generic code (matcher, criterion, post-processing, engine, match-debug) relies only on this
contract, on the class attribute ``focal`` (softmax + "no object" head, or sigmoid focal
head: a fixed property of the architecture) and on ``model.config.loss``; it never
special-cases a method.

Each method file exports a :class:`MethodSpec` as ``SPEC``: its config class and its model
class. The registry pairs it with the method's presets (``qdet.engine.presets``) and its
official-checkpoint hooks (``qdet.weights.official``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from ..ops.modes import exporting


@dataclass
class LossConfig:
    """Matcher costs and loss weights; one instance per model config. Whether the class
    terms are softmax or sigmoid focal is not here: it is the model's ``focal``."""
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1          # softmax: weight of the no-object class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # two-stage: encoder proposals are scored object-vs-background (every target label 0)
    enc_class_agnostic: bool = False
    # DEIM's matchability-aware loss instead of the focal loss (focal heads): a matched
    # query's target is its IoU to the power mal_gamma
    mal: bool = False
    mal_gamma: float = 1.5


def focal_loss_config() -> LossConfig:
    """The weights of Deformable DETR and its sigmoid-focal successors (class cost and loss
    weight 2; L1 5; GIoU 2)."""
    return LossConfig(class_cost=2.0, class_weight=2.0)


HeadKind = Literal["classes", "object"]


def class_key(name) -> str:
    """What makes two class names the same class, everywhere in qdet (evaluation by name,
    fine-tuning's rows copied by name): case-insensitive, with spaces, ``_`` and ``-``
    alike ("Traffic_Light" is "traffic light")."""
    return " ".join(re.split(r"[\s_\-]+", str(name).strip().lower())).strip()


class Detector(nn.Module):
    """Base class: holds the config and the label metadata that a checkpoint carries.

    Subclasses set ``arch`` (the registry name), ``title`` (the method as a reader names it),
    ``focal`` (True: sigmoid focal head with ``C`` outputs; False: softmax head with ``C+1``,
    the last "no object") and ``compiled_parts`` (the submodules ``compile_transformer``
    compiles).
    """

    arch: str = ""
    title: str = ""
    focal: bool = True
    compiled_parts: tuple[str, ...] = ("transformer",)

    @classmethod
    def title_for(cls, config: dict) -> str:
        """The method's name for a run of ``config`` (a config as a dict), its variant
        included where the method has variants."""
        return cls.title or cls.arch

    def __init__(self, config):
        super().__init__()
        self.config = config
        # label i of the model <-> dataset category id / name (set by training or loading)
        self.category_ids: list[int] = list(range(config.num_classes))
        self.class_names: list[str] = [str(i) for i in range(config.num_classes)]
        # inference resize (shorter side, longer-side cap); official models: 800 / 1333
        self.preprocess: dict = {"size": 800, "max_size": 1333}
        # what a qdet checkpoint says about its data: {"data": spec, "train": {"shapes": ...}}
        self.data_info: dict = {}
        # focal heads: detections kept per image, the best (query, class) pairs (DINO: 300)
        self.max_detections: int = 100

    def class_heads(self) -> dict[str, HeadKind]:
        """The Linear layers that predict classes, by module name (a shared head may appear
        under several names): ``"classes"`` (row i scores label i; softmax heads add "no
        object" as the last row) or ``"object"`` (class-agnostic: row 0 scores any object,
        e.g. a two-stage encoder trained with ``loss.enc_class_agnostic``). Fine-tuning to
        other classes rebuilds exactly these rows (``qdet.weights.finetune``)."""
        return {"class_embed": "classes"}

    def compile_transformer(self) -> None:
        """torch.compile the model's ``compiled_parts`` in place (parameter names are
        unchanged)."""
        for name in self.compiled_parts:
            getattr(self, name).compile()


@dataclass(frozen=True)
class MethodSpec:
    """What a method file exports: its config dataclass (the paper's defaults) and its
    model class (a :class:`Detector` built from that config)."""
    config: type
    model: type[Detector]

    @property
    def arch(self) -> str:
        return self.model.arch


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device (a model run by onnxruntime has no
    parameters and takes CPU tensors)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------- inputs


def batch_images(images: Tensor | Sequence[Tensor], divisor: int = 1) -> tuple[Tensor, Tensor]:
    """Pad images to one tensor and return ``(x [B,3,H,W], mask [B,H,W])``.

    ``mask`` is True on padded pixels. Images are padded at the bottom and right to the
    largest height and width in the batch (rounded up to a multiple of ``divisor``), as the
    official DETR (divisor 1) and detectron2 (32) code do.
    """
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        if divisor == 1 or (not exporting() and h % divisor == 0 and w % divisor == 0):
            return images, torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        # pad by amounts computed from the (possibly traced) sizes, without a Python loop;
        # no negative floor division, which ONNX's integer Div would truncate
        ph, pw = (h + divisor - 1) // divisor * divisor, (w + divisor - 1) // divisor * divisor
        x = F.pad(images, (0, pw - w, 0, ph - h))
        dev = images.device
        mask = ((torch.arange(ph, device=dev) >= h)[:, None]
                | (torch.arange(pw, device=dev) >= w)[None, :])
        return x, mask[None].expand(b, -1, -1)
    if len(images) == 0:
        raise ValueError("expected at least one image")
    h = -(-max(int(im.shape[-2]) for im in images) // divisor) * divisor
    w = -(-max(int(im.shape[-1]) for im in images) // divisor) * divisor
    first = images[0]
    x = first.new_zeros(len(images), first.shape[0], h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool, device=first.device)
    for i, im in enumerate(images):
        x[i, :, : im.shape[-2], : im.shape[-1]] = im
        mask[i, : im.shape[-2], : im.shape[-1]] = False
    return x, mask


def resize_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of a padding mask ``[B,H,W]`` to a feature map size."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class MLP(nn.Module):
    """A few linear layers with ReLU between them (DETR's box head, and many others)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped so that 0 and 1 stay finite (as the official repositories do)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_from_reference(delta: Tensor, ref: Tensor) -> Tensor:
    """Box = sigmoid(delta + logit(reference)) for a 4-d reference box; a 2-d reference
    point moves only the centre (width and height are predicted outright)."""
    if ref.shape[-1] == 4:
        return (delta + inverse_sigmoid(ref)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1).sigmoid()


def layer_outputs(logits: Tensor, boxes: Tensor, aux: bool) -> dict:
    """Per-layer predictions ``[L,B,Q,*]`` -> the output dict: the last layer's, and the
    earlier ones as ``aux_outputs`` when ``aux``."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                              for a, b in zip(logits[:-1], boxes[:-1])]
    return out


def class_probs(logits: Tensor, focal: bool) -> Tensor:
    """Per-class probabilities ``[..., C]``: sigmoid for focal heads, softmax with the
    "no object" column dropped for softmax heads."""
    return logits.sigmoid() if focal else logits.softmax(-1)[..., :-1]


@torch.no_grad()
def postprocess_batch(outputs: dict, sizes: Tensor, focal: bool,
                      topk: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """Model outputs -> ``scores [B,K]``, ``labels [B,K]``, ``boxes [B,K,4]``.

    Boxes are absolute (x0, y0, x1, y1) in the frame given by ``sizes [B,2]`` as (h, w),
    usually the original image size. Softmax models give every query its best real class
    (K = Q); focal models keep the ``topk`` best (query, class) pairs, as their papers do.
    """
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    prob = class_probs(logits, focal)
    if focal:
        _, q, c = prob.shape
        scores, idx = prob.flatten(1).topk(min(topk, q * c), dim=1)
        labels = idx % c
        boxes = torch.gather(boxes, 1, (idx // c)[..., None].expand(-1, -1, 4))
    else:
        scores, labels = prob.max(-1)
    h, w = sizes.to(boxes).unbind(1)
    scale = torch.stack([w, h, w, h], 1)[:, None]
    boxes = (box_convert(boxes, "cxcywh", "xyxy").clamp(0, 1) * scale)  # clipped to the image
    return scores, labels, boxes


def postprocess(outputs: dict, sizes: Tensor, focal: bool, topk: int = 100) -> list[dict]:
    """:func:`postprocess_batch` per image: ``[{scores [K], labels [K], boxes [K,4]}]``."""
    scores, labels, boxes = postprocess_batch(outputs, sizes, focal, topk)
    return [{"scores": s, "labels": l, "boxes": x} for s, l, x in zip(scores, labels, boxes)]
