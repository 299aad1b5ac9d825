"""The training config: optimization, data loading, precision, augmentation, the built-in
data, a wall-clock budget, gradient accumulation and the weights' moving average; a method's
preset overrides its defaults (``qdet.engine.presets``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.shapes import ShapesConfig
from ..data.transforms import AugmentConfig
from .budget import TimeConfig
from .ema import EMAConfig


@dataclass
class TrainConfig:
    """Optimization and data-loading settings; a method's preset overrides the defaults."""
    epochs: int = 50
    batch_size: int = 2                 # per process
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_slow_names: tuple[str, ...] = ()  # parameters whose name contains one of these ...
    lr_slow_mult: float = 0.1            # ... train at lr * lr_slow_mult (Deformable DETR)
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    schedule: str = "step"              # "step": x0.1 at each of lr_drops (epochs); "cosine"
    lr_drops: tuple[int, ...] = (400,)
    warmup_steps: int = 0
    num_workers: int = 2
    seed: int = 42
    eval_every: int = 1
    compile: bool = False
    precision: str = "fp32"             # "fp32", "bf16" (autocast), or "auto": bf16 where
                                        # the hardware has it (AVX-512 BF16 CPUs, recent GPUs)
    channels_last: bool = False         # NHWC convolutions (faster on CPU)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)  # the built-in data, if used
    time: TimeConfig = field(default_factory=TimeConfig)  # a wall-clock budget, not epochs
    tensorboard: bool = False           # also log scalars to RUN/tensorboard
    accumulate: int = 1                 # micro-batches of batch_size per optimizer step
    ema: EMAConfig = field(default_factory=EMAConfig)     # an average of the weights
