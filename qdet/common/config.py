"""Configs are dataclasses (a method's ``Config``, ``TrainConfig``): written to plain dicts
(``config.json``, checkpoints), read back, and changed by dotted-key overrides (``--set``)."""
from __future__ import annotations

import dataclasses
from typing import Any


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
