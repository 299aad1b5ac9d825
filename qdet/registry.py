"""The architectures qdet knows: a new method is one file plus one line in ``ARCHS``.

Each method module defines ``Config`` (a dataclass with the paper's defaults), ``Model``
(a :class:`qdet.base.Detector` built from a Config), ``PAPER`` and ``SHAPES`` presets
(``dict(model=..., train=...)`` overrides), and for official checkpoints
``is_official(state_dict)`` and ``official_config(state_dict, args)``.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

ARCHS: dict[str, str] = {
    "detr": "qdet.detr",
    "deformable": "qdet.deformable_detr",
    "conditional": "qdet.conditional_detr",
    "anchor": "qdet.anchor_detr",
    "sparse-rcnn": "qdet.sparse_rcnn",
    "efficient": "qdet.efficient_detr",
    "dynamic": "qdet.dynamic_detr",
}


def arch_module(name: str) -> ModuleType:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")
    return importlib.import_module(ARCHS[name])


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
    type of the field they replace (``{'loss.focal': 'true', 'd_model': 128}``)."""
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


def build_model(arch: str, overrides: dict[str, Any] | None = None):
    """A fresh model of ``arch`` with its paper config plus ``overrides``."""
    mod = arch_module(arch)
    cfg = apply_overrides(mod.Config(), overrides or {})
    return mod.Model(cfg)


def official_arch(state_dict: dict) -> str | None:
    """Which architecture's official release layout ``state_dict`` is in, if any."""
    for name in ARCHS:
        mod = arch_module(name)
        if hasattr(mod, "is_official") and mod.is_official(state_dict):
            return name
    return None
