"""The package's layering: method files sit just above the shared blocks and import nothing
above them; building a model loads no training or terminal code; no import cycles."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qdet
from qdet.checkpoint import CheckpointError, model_checkpoint, model_from_checkpoint
from qdet.registry import ARCHS, build_model, method

from conftest import TINY

PACKAGE = Path(qdet.__file__).parent
METHODS = {path.rsplit(".", 1)[1] for path in ARCHS.values()}
# what a method file may be built from (a new shared block is added here on purpose)
SHARED = {"base", "backbone", "position_encoding", "deform_attn", "deform_attn_kernels",
          "deform_conv", "deform_conv_kernels", "roi_align", "roi_align_kernels", "layers",
          "dynamic_head"}


def qdet_imports(name: str, top_level_only: bool = False) -> set[str]:
    """The qdet modules that module ``name`` imports (relative or absolute)."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("qdet"):
                base = (node.module or "").removeprefix("qdet").lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import x, y
                    found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("qdet."))
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_method_files_import_only_shared_blocks():
    for name in METHODS:
        extra = qdet_imports(name) - SHARED
        assert not extra, f"qdet/{name}.py imports {sorted(extra)}, which are not shared blocks"


def test_shared_blocks_import_no_method_or_higher_layer():
    for name in SHARED:
        extra = qdet_imports(name) - SHARED
        assert not extra, f"qdet/{name}.py (a shared block) imports {sorted(extra)}"


def test_no_import_cycles():
    graph = {p.stem: qdet_imports(p.stem, top_level_only=True) for p in PACKAGE.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_building_a_model_loads_no_training_or_terminal_code():
    code = ("import sys, qdet; qdet.build_model('detr'); "
            "print(','.join(m for m in ('pycocotools', 'rich', 'typer', 'qdet.engine', "
            "'qdet.runs', 'qdet.data', 'qdet.official', 'qdet.presets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == ""


def test_every_method_exports_a_spec_and_presets():
    for name in ARCHS:
        m = method(name)
        assert m.model.arch == name and set(m.presets) == {"paper", "shapes"}


def test_head_kind_is_fixed_by_the_architecture():
    assert not method("detr").focal and all(method(a).focal for a in ARCHS if a != "detr")
    for override in ({"loss.focal": "true"}, {"loss": {"focal": True}}):
        with pytest.raises(ValueError, match="fixed by the architecture"):
            build_model("detr", {**TINY["detr"], **override})
    with pytest.raises(ValueError, match="fixed by the architecture"):
        build_model("conditional", {**TINY["conditional"], "loss.focal": "false"})


def test_checkpoints_from_before_the_head_kind_moved_still_load():
    """qdet-1 files stored ``loss.focal`` (and Conditional DETR a ``pre_norm``): they load
    when the head kind agrees, and are refused clearly when it does not."""
    model = build_model("conditional", TINY["conditional"]).eval()
    ckpt = model_checkpoint(model)
    ckpt["config"] = {**ckpt["config"], "pre_norm": False,
                      "loss": {**ckpt["config"]["loss"], "focal": True}}
    loaded = model_from_checkpoint(ckpt).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x)["pred_logits"], model(x)["pred_logits"])
    ckpt["config"]["loss"]["focal"] = False
    with pytest.raises(CheckpointError, match="loss.focal=False"):
        model_from_checkpoint(ckpt)
