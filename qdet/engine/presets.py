"""Training recipes: per method, the paper's (``paper``, used with COCO-format data) and a
small from-scratch one for the built-in shapes data (``shapes``, the default without data).

A preset is a pair of override dicts: ``model`` for the method's config dataclass (its
defaults are the paper's model) and ``train`` for :class:`qdet.engine.trainer.TrainConfig`. The
engine reads presets; the models never do. Options a user sets override a preset; options
left unset never do.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

from ..data.transforms import AugmentConfig

# The backbone part of every built-in-data preset: no pretrained weights, so ordinary
# BatchNorm and every stage trained (habits for pretrained backbones do not fit here).
FROM_SCRATCH = dict(backbone="resnet18", frozen_bn=False, backbone_trainable=5)

# The training part of every built-in-data preset (methods override a few keys): from
# scratch in minutes on a CPU, so a short warmup, cosine decay, bf16 where native. The data
# is drawn in the training process: on 2 cores two loader workers took the cores from the
# step (0.937 s a step with them, 0.854 s without, for Conditional DETR with --dn 5
# --query-groups 3).
# The training-only switches (--dn, --query-groups, --ema) stay off here: in the race with
# and without them (docs/benchmarks.md "The switches in the race": 10 minutes, one core of
# an AMD EPYC without AVX-512 per run) none raised AP at the same wall-clock budget, and
# they lowered it for Conditional DETR, Efficient DETR, Sparse R-CNN and Dynamic DETR.
SHAPES_TRAIN = dict(lr=2e-4, lr_backbone=2e-4, weight_decay=1e-4, batch_size=16, epochs=8,
                    schedule="cosine", warmup_steps=100, clip_max_norm=0.1, precision="auto",
                    channels_last=True, num_workers=0)

# The small transformer of the built-in-data presets: width 128, 3+3 layers, 20 queries.
_SMALL = dict(d_model=128, nheads=8, enc_layers=3, dec_layers=3, dim_feedforward=512)

# Deformable DETR trains its sampling offsets and reference points at a tenth of the lr.
_DEFORMABLE_SLOW = dict(lr_slow_names=("reference_points", "sampling_offsets"),
                        lr_slow_mult=0.1)


@dataclass(frozen=True)
class Preset:
    model: dict = field(default_factory=dict)   # overrides of the method's Config
    train: dict = field(default_factory=dict)   # overrides of TrainConfig


_DEFORMABLE_PAPER = dict(lr=2e-4, lr_backbone=2e-5, **_DEFORMABLE_SLOW, weight_decay=1e-4,
                         batch_size=2, epochs=50, lr_drops=(40,), clip_max_norm=0.1)
_DEFORMABLE_SHAPES = Preset(
    model=dict(**FROM_SCRATCH, num_feature_levels=3, **_SMALL, dropout=0.0, num_queries=20),
    train=dict(SHAPES_TRAIN, **_DEFORMABLE_SLOW))

PRESETS: dict[str, dict[str, Preset]] = {
    "detr": {
        # COCO, 8 GPUs x 2 images: lr 1e-4, backbone 1e-5, 500 epochs
        "paper": Preset(train=dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, batch_size=2,
                                   epochs=500, lr_drops=(400,), clip_max_norm=0.1)),
        # from scratch on the built-in data in ~10 CPU minutes (docs/training.md "Built-in presets")
        "shapes": Preset(
            model=dict(**FROM_SCRATCH, backbone_layer=3, **_SMALL, dropout=0.0, num_queries=20),
            train=dict(SHAPES_TRAIN, epochs=10)),
    },
    "conditional": {
        "paper": Preset(train=dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, batch_size=2,
                                   epochs=50, lr_drops=(40,), clip_max_norm=0.1)),
        # The quickstart. Against the shared preset (lr 2e-4, 20 queries; AP50 0.862 at the
        # last epoch): 30 queries gave 0.875, lr 3e-4 0.886 (4e-4: 0.859), both 0.897.
        "shapes": Preset(
            model=dict(**FROM_SCRATCH, backbone_layer=3, **_SMALL, dropout=0.0, num_queries=30),
            train=dict(SHAPES_TRAIN, epochs=10, lr=3e-4, lr_backbone=3e-4)),
    },
    "deformable": {"paper": Preset(train=_DEFORMABLE_PAPER), "shapes": _DEFORMABLE_SHAPES},
    "anchor": {
        # 8 GPUs x 1 image, 50 epochs, lr 1e-4 (backbone 1e-5), drop at 40
        "paper": Preset(train=dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, batch_size=1,
                                   epochs=50, lr_drops=(40,), clip_max_norm=0.1)),
        "shapes": Preset(
            model=dict(**FROM_SCRATCH, backbone_layer=3, **_SMALL, num_anchors=10,
                       num_patterns=2),
            train=dict(SHAPES_TRAIN)),
    },
    "sparse-rcnn": {
        # 3x schedule: AdamW 2.5e-5, batch 16, 36 epochs with drops at 27 and 33
        "paper": Preset(train=dict(lr=2.5e-5, lr_backbone=2.5e-5, weight_decay=1e-4,
                                   batch_size=2, epochs=36, lr_drops=(27, 33),
                                   clip_max_norm=1.0, warmup_steps=1000)),
        "shapes": Preset(
            model=dict(**FROM_SCRATCH, d_model=128, num_proposals=20, num_heads=3, nheads=8,
                       dim_feedforward=512, dim_dynamic=32),
            train=dict(SHAPES_TRAIN, clip_max_norm=1.0)),
    },
    "efficient": {
        # the paper trains 36 epochs; optimizer settings follow Deformable DETR (not stated)
        "paper": Preset(train=dict(_DEFORMABLE_PAPER, epochs=36, lr_drops=(30,))),
        "shapes": Preset(model=dict(_DEFORMABLE_SHAPES.model, dec_layers=1),
                         train=_DEFORMABLE_SHAPES.train),
    },
    "dino": {
        # the official config: AdamW 1e-4 (backbone 1e-5), batch 2 x 8 GPUs, 12 epochs,
        # drop at 11, clip 0.1
        "paper": Preset(train=dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, batch_size=2,
                                   epochs=12, lr_drops=(11,), clip_max_norm=0.1)),
        # Deformable DETR's small model; 20 contrastive denoising queries (5 groups of up to
        # four boxes), not DINO's 100, which would run ten times the 20 matching queries
        "shapes": Preset(
            model=dict(**FROM_SCRATCH, num_feature_levels=3, **_SMALL, num_queries=20,
                       **{"dn.queries": 20}),
            train=dict(SHAPES_TRAIN, **_DEFORMABLE_SLOW)),
    },
    "dynamic": {
        # 1x schedule (12 epochs, lr drop at 11); optimizer as Sparse R-CNN's (not stated)
        "paper": Preset(train=dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, batch_size=2,
                                   epochs=12, lr_drops=(11,), clip_max_norm=1.0,
                                   warmup_steps=1000)),
        # One encoder block, not the paper's six: with six (no residual connections, from
        # scratch) AP after 500 steps was 0.004 against 0.13-0.18 with one, at 2.4x the
        # time (docs/training.md "Built-in presets").
        "shapes": Preset(
            model=dict(**FROM_SCRATCH, d_model=128, num_levels=3, enc_blocks=1, num_queries=20,
                       dec_layers=3, nheads=8, dim_feedforward=512, dim_dynamic=32),
            train=dict(SHAPES_TRAIN, clip_max_norm=1.0)),
    },
}


def preset(arch: str, kind: str) -> Preset:
    """The ``kind`` ("paper" or "shapes") preset of ``arch``."""
    if arch not in PRESETS:
        raise ValueError(f"no presets for architecture {arch!r}; add them to qdet/presets.py")
    if kind not in PRESETS[arch]:
        raise ValueError(f"preset must be one of {', '.join(PRESETS[arch])}, got {kind!r}")
    return PRESETS[arch][kind]


# ------------------------------------------------------------------------- image sizes

# The built-in data's image side, for which the shapes presets are tuned: a user's data
# trained with --preset shapes is resized to it, as the recipe's other settings assume.
SHAPES_SIZE = 128
MIN_SIDE = 32


def shapes_augment(size: int = SHAPES_SIZE) -> AugmentConfig:
    """The built-in data's augmentation: one size, no crop (flips only)."""
    return AugmentConfig(train_scales=(size,), max_size=None, crop=False, eval_size=size)


def data_sides(dataset, limit: int = 500) -> list[int]:
    """The shorter sides of (up to ``limit`` of) a dataset's images, from its declared sizes
    where it has them, else from the images themselves."""
    images = dataset.coco_dict().get("images", [])
    sides = [min(im["width"], im["height"]) for im in images[:limit]
             if im.get("width") and im.get("height")]
    if len(sides) < min(len(images), limit):
        step = max(1, len(dataset) // min(limit, 50))
        sides = [min(dataset.raw_image(i).size) for i in range(0, len(dataset), step)][:50]
    return sides


def sized_for_data(aug: AugmentConfig, sides: list[int]) -> tuple[AugmentConfig, str]:
    """The paper's augmentation fitted to a dataset whose images have shorter sides
    ``sides``: when their median is under the paper's evaluation size, every size is scaled
    by median / eval size, so that no image is enlarged several times (the papers' 480-800
    would enlarge 128-pixel images about 6 times, at 40 times the cost); returns the
    config and a line that says what was chosen and why."""
    median = int(statistics.median(sides)) if sides else aug.eval_size
    lo, hi = min(aug.train_scales), max(aug.train_scales)
    if median >= aug.eval_size:
        return aug, (f"image sizes: the paper's (shorter side {lo}-{hi} in training, "
                     f"{aug.eval_size} in evaluation, longer side at most {aug.max_size}); "
                     f"the data's median shorter side is {median} px")
    f = median / aug.eval_size

    def scale(v: int) -> int:
        return max(MIN_SIDE, int(round(v * f)))
    fitted = dataclasses.replace(
        aug, train_scales=tuple(sorted({scale(v) for v in aug.train_scales})),
        max_size=scale(aug.max_size) if aug.max_size else None,
        crop_scales=tuple(sorted({scale(v) for v in aug.crop_scales})),
        crop_size=(scale(aug.crop_size[0]), scale(aug.crop_size[1])), eval_size=median)
    return fitted, (f"image sizes: the paper's scaled by {f:.2f} to the data's median shorter "
                    f"side, {median} px (its {lo}-{hi} would enlarge the images up to "
                    f"{hi / median:.1f}x): training at {min(fitted.train_scales)}-"
                    f"{max(fitted.train_scales)}, evaluating at {median}, longer side at most "
                    f"{fitted.max_size}; --set augment.* chooses others")
