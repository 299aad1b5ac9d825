"""Fine-tuning a pretrained detector to a dataset's own classes.

The new model is the source's architecture and sizes with the dataset's class count, built
by its method (so every new class row starts as the method initialises it: for focal heads,
the prior-probability bias). :func:`transfer` then loads every source tensor that fits and
rebuilds the class heads the model declares (``Detector.class_heads``): a dataset class
whose name is a source class name (``qdet.blocks.base.class_key``: case-insensitive, spaces,
``_`` and ``-`` alike) gets that class's weight and bias rows, in every head (all decoder layers, aux, encoder,
every stage); softmax heads keep their "no object" row; class-agnostic heads keep row 0.
Shared heads stay shared: rows are copied into the modules in place. What was not loaded is
reported, never dropped silently.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..blocks.base import Detector, class_key

# placeholder names of unused labels (COCO's 91-way heads) never match a dataset class
_PLACEHOLDERS = {"n/a", ""}


def match_classes(source: list[str], target: list[str]) -> list[int | None]:
    """For each target class, the index of the source class with the same name, or None."""
    index: dict[str, int] = {}
    for i, name in enumerate(source):
        key = class_key(name)
        if key not in _PLACEHOLDERS:
            index.setdefault(key, i)
    return [index.get(class_key(n)) for n in target]


def class_heads(model: Detector) -> dict[str, str]:
    """The modules with a row per class: the class heads the model declares, and the
    denoising queries' label embedding when it has one (kind ``"label"``: a row per class,
    no "no object" row, no bias)."""
    heads = dict(model.class_heads())
    if getattr(model, "dn_label", None) is not None:
        heads["dn_label"] = "label"
    return heads


def class_head_modules(model: Detector) -> list[tuple[str, str, nn.Module]]:
    """``(first name, kind, module)`` of each distinct class head of ``model``, checked to be
    a Linear layer with one output per class (+1 on softmax heads), or an Embedding with a
    row per class (a label embedding)."""
    rows = model.config.num_classes + (0 if model.focal else 1)
    seen: dict[int, tuple[str, str, nn.Module]] = {}
    for name, kind in class_heads(model).items():
        module = model.get_submodule(name)
        ok = (isinstance(module, nn.Embedding) and module.num_embeddings ==
              model.config.num_classes) if kind == "label" else \
            (isinstance(module, nn.Linear) and module.out_features == rows)
        if not ok:
            raise TypeError(f"{type(model).__name__}: class head {name} is not a Linear "
                            f"layer with {rows} outputs (or a label embedding with a row per "
                            "class)")
        seen.setdefault(id(module), (name, kind, module))
    return list(seen.values())


@dataclass
class Transfer:
    """What :func:`transfer` did, for the terminal and the run's config.json."""
    source: str
    loaded: int                                   # source tensors loaded (whole or by rows)
    total: int                                    # tensors in the source
    copied: list[list[str]] = field(default_factory=list)   # [dataset class, source class]
    new: list[str] = field(default_factory=list)            # dataset classes initialised
    not_loaded: dict[str, str] = field(default_factory=dict)  # source tensor -> why
    num_classes: int = 0
    query_groups: list[int] = field(default_factory=list)   # [source, target] when they differ

    def summary(self) -> str:
        """One line: "loaded X of Y tensors; class rows: N of M copied by name (...), K new
        (...)"."""
        def names(items: list[str]) -> str:
            shown = ", ".join(items[:6])
            return f" ({shown}{', ...' if len(items) > 6 else ''})" if items else ""

        line = (f"loaded {self.loaded} of {self.total} tensors; class rows: {len(self.copied)} "
                f"of {self.num_classes} copied by name{names([c for c, _ in self.copied])}, "
                f"{len(self.new)} new{names(self.new)}")
        if self.query_groups:
            ks, kt = self.query_groups
            line += (f"; query groups {ks} -> {kt}: " + (
                "group 0 kept (the one inference runs)" if kt == 1 else
                f"{min(ks, kt)} copied, {max(kt - ks, 0)} new"))
        if self.not_loaded:
            line += f"; not loaded: {names(list(self.not_loaded))[2:-1]}"
        return line

    def to_json(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


@torch.no_grad()
def transfer(source: Detector, target: Detector, source_name: str = "weights") -> Transfer:
    """Load ``source``'s weights into ``target`` (same architecture; ``target`` built for the
    dataset's classes, its ``class_names`` set): every tensor that fits, and the class rows
    matched by name. Returns what was done."""
    if source.arch != target.arch:
        raise ValueError(f"{source_name} is a {source.arch} model, not {target.arch}")
    src, tgt = source.state_dict(), target.state_dict()
    head_keys = {f"{name}.{p}" for name in class_heads(target) for p in ("weight", "bias")}
    fits = {k: v for k, v in src.items()
            if k not in head_keys and k in tgt and tgt[k].shape == v.shape}
    grouped = _grouped(source, target, src, tgt, set(fits) | head_keys)
    not_loaded = {}
    for k, v in src.items():
        if k in head_keys or k in fits or k in grouped:
            continue
        not_loaded[k] = ("not in the fine-tuned model" if k not in tgt else
                         f"shape {tuple(v.shape)} vs {tuple(tgt[k].shape)}")
    target.load_state_dict(fits, strict=False)
    for k, rows in grouped.items():       # the groups both have; the others as initialised
        tgt[k][:rows].copy_(src[k][:rows])

    rows = match_classes(list(source.class_names), list(target.class_names))
    pairs = [(j, i) for j, i in enumerate(rows) if i is not None]
    src_heads = dict(source.named_modules())
    copied: dict[int, bool] = {}          # per head module: did any row come across
    for name, kind, module in class_head_modules(target):
        theirs = src_heads.get(name)
        copy = []
        if type(theirs) is type(module) and theirs.weight.shape[1] == module.weight.shape[1]:
            copy = [(0, 0)] if kind == "object" else list(pairs)
            if not target.focal and kind == "classes":  # the "no object" row, last in both
                copy.append((module.weight.shape[0] - 1, theirs.weight.shape[0] - 1))
        for j, i in copy:
            module.weight[j] = theirs.weight[i]
            if getattr(module, "bias", None) is not None:
                module.bias[j] = theirs.bias[i]
        copied[id(module)] = bool(copy)
    loaded_heads = 0
    for name in class_heads(target):
        for key in (f"{name}.weight", f"{name}.bias"):
            if key not in src:
                continue
            if copied[id(target.get_submodule(name))]:
                loaded_heads += 1
            else:
                not_loaded[key] = "no dataset class matches a source class by name"
    groups = [_groups(source), _groups(target)]
    return Transfer(source_name, len(fits) + len(grouped) + loaded_heads, len(src),
                    [[target.class_names[j], source.class_names[i]] for j, i in pairs],
                    [target.class_names[j] for j, i in enumerate(rows) if i is None],
                    not_loaded, len(target.class_names),
                    groups if groups[0] != groups[1] else [])


def _groups(model: Detector) -> int:
    return getattr(model.config, "query_groups", 1)


def _grouped(source: Detector, target: Detector, src: dict, tgt: dict,
             done: set) -> dict[str, int]:
    """Query parameters of models with different numbers of query groups (Group DETR: each
    group has its own rows, group g the g-th block): key -> the rows to copy, those of the
    groups both models have. A model trained with K groups fine-tunes with one (group 0, the
    one inference runs) or more (the new groups start as the method initialises them: copies
    of group 0 would stay identical, matched and trained alike)."""
    ks, kt = _groups(source), _groups(target)
    out = {}
    if ks == kt:
        return out
    for k, v in src.items():
        t = tgt.get(k)
        if k in done or t is None or v.dim() != t.dim() or v.shape[1:] != t.shape[1:]:
            continue
        if v.shape[0] % ks == 0 and t.shape[0] % kt == 0 and v.shape[0] // ks == t.shape[0] // kt:
            out[k] = v.shape[0] // ks * min(ks, kt)
    return out
