"""The architectures qdet knows: a new method is one file plus one line in ``ARCHS``.

Each method module exports ``SPEC``, a :class:`qdet.blocks.base.MethodSpec` (its config
dataclass with the paper's defaults, and its model class); :func:`method` reads it. What else
a method has lives apart from the model: its training presets in ``qdet.engine.presets``,
how its official release checkpoints are read in ``qdet.weights.official``. Importing a
method imports only the blocks and ops it is built from.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..common.config import apply_overrides

if TYPE_CHECKING:  # importing base imports torch: `qdet --help` lists ARCHS without it
    from ..blocks.base import Detector

ARCHS: dict[str, str] = {
    "detr": "qdet.models.detr",
    "deformable": "qdet.models.deformable_detr",
    "conditional": "qdet.models.conditional_detr",
    "anchor": "qdet.models.anchor_detr",
    "sparse-rcnn": "qdet.models.sparse_rcnn",
    "efficient": "qdet.models.efficient_detr",
    "dynamic": "qdet.models.dynamic_detr",
    "dino": "qdet.models.dino",
}


# Named variants of a method (benchmarks take them where an architecture is asked for):
# name -> (architecture, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "deformable-refine": ("deformable", {"with_box_refine": True}),
    "deformable-two-stage": ("deformable", {"with_box_refine": True, "two_stage": True}),
}


def variant(name: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, overrides)`` of an architecture or a named variant."""
    if name in VARIANTS:
        return VARIANTS[name]
    method(name)    # an unknown name says which exist
    return name, {}


@dataclass(frozen=True)
class Method:
    """One architecture: its config and model classes (the method file's ``SPEC``), its
    head kind and its paper."""
    name: str
    config: type                 # dataclass, the paper's defaults
    model: type[Detector]

    @property
    def focal(self) -> bool:
        """Sigmoid focal head (C outputs) or softmax head (C+1, last "no object")."""
        return self.model.focal

    @property
    def paper(self) -> str:
        """The paper, as the first line of the method file's docstring."""
        doc = sys.modules[self.model.__module__].__doc__ or self.name
        return doc.strip().splitlines()[0]


def method(name: str) -> Method:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}"
                         + (f" (variants: {', '.join(VARIANTS)})" if VARIANTS else ""))
    from ..blocks.base import MethodSpec

    spec = importlib.import_module(ARCHS[name]).SPEC
    if not isinstance(spec, MethodSpec) or spec.arch != name:
        raise TypeError(f"{ARCHS[name]}.SPEC must be a MethodSpec whose model's arch is {name!r}")
    return Method(name, spec.config, spec.model)


def _check_head_kind(arch: str, overrides: dict[str, Any]) -> None:
    """Refuse to set ``loss.focal``: the head kind is fixed by the architecture (a softmax
    head has a "no object" row that a focal head does not, and post-processing differs)."""
    for key, value in overrides.items():
        if key in ("focal", "loss.focal") or (key == "loss" and isinstance(value, dict)
                                              and "focal" in value):
            focal = [a for a in ARCHS if method(a).focal]
            kind = "sigmoid focal" if method(arch).focal else "softmax (+1 'no object')"
            raise ValueError(
                f"'loss.focal' cannot be set: whether the class head is softmax or sigmoid "
                f"focal is fixed by the architecture ({arch}: {kind}); pick another --arch "
                f"for the other kind (focal: {', '.join(focal)})")


def build_config(arch: str, overrides: dict[str, Any] | None = None):
    """The paper config of ``arch`` with dotted-key ``overrides``."""
    overrides = overrides or {}
    _check_head_kind(arch, overrides)
    return apply_overrides(method(arch).config(), overrides)


def build_model(arch: str, overrides: dict[str, Any] | None = None) -> Detector:
    """A fresh model of ``arch`` with its paper config plus ``overrides``."""
    return method(arch).model(build_config(arch, overrides))
