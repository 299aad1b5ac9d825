"""The architectures qdet knows: a new method is one file plus one line in ``ARCHS``.

Each method module exports ``SPEC``, a :class:`qdet.base.MethodSpec` (its config dataclass
with the paper's defaults, and its model class). :func:`method` pairs it with its training
presets (``qdet.presets``), which live outside the method file; how its official release
checkpoints are read lives in ``qdet.official``. Importing a method imports only the shared
blocks it is built from.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing base imports torch: `qdet --help` lists ARCHS without it
    from .base import Detector

ARCHS: dict[str, str] = {
    "detr": "qdet.detr",
    "deformable": "qdet.deformable_detr",
    "conditional": "qdet.conditional_detr",
    "anchor": "qdet.anchor_detr",
    "sparse-rcnn": "qdet.sparse_rcnn",
    "efficient": "qdet.efficient_detr",
    "dynamic": "qdet.dynamic_detr",
}


@dataclass(frozen=True)
class Method:
    """One architecture: its config and model classes (the method file's ``SPEC``), its
    head kind, its paper and its presets."""
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

    @property
    def presets(self) -> dict:
        """``{"paper": Preset, "shapes": Preset}`` (``qdet.presets``)."""
        from .presets import PRESETS

        return PRESETS.get(self.name, {})


def method(name: str) -> Method:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")
    from .base import MethodSpec

    spec = importlib.import_module(ARCHS[name]).SPEC
    if not isinstance(spec, MethodSpec) or spec.arch != name:
        raise TypeError(f"{ARCHS[name]}.SPEC must be a MethodSpec whose model's arch is {name!r}")
    return Method(name, spec.config, spec.model)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, data: dict):
    """Rebuild a (possibly nested) config dataclass; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__module__}.{cls.__name__} has no field(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = config_from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(text: str, like: Any):
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, tuple):
        return tuple(_coerce(t, like[0]) if like else int(t) for t in text.split(",") if t)
    if like is None:
        return None if text.lower() in ("none", "null", "") else text
    return text


def apply_overrides(cfg, overrides: dict[str, Any]):
    """Return a copy of ``cfg`` with dotted-key overrides; string values are parsed by the
    type of the field they replace (``{'loss.giou_weight': '3', 'd_model': 128}``)."""
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if not any(f.name == head for f in dataclasses.fields(cfg)):
            names = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ValueError(f"unknown option {key!r} for {type(cfg).__name__}; options: {names}")
        current = getattr(cfg, head)
        if rest:
            value = apply_overrides(current, {rest: value})
        elif dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = apply_overrides(current, value)
        elif isinstance(value, str) and not isinstance(current, str):
            value = _coerce(value, current)
        cfg = dataclasses.replace(cfg, **{head: value})
    return cfg


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
