"""The package's layering, read from every import statement (function-level ones included):
the folders run one way, cli -> tools -> engine -> weights -> models -> blocks -> ops, with
data and common beside; method files import only blocks and ops; ops import nothing else of
qdet; no import cycle between modules or between folders; nothing below the CLI imports typer
or rich when it is imported; building a model loads no training or terminal code. (That
``qdet --help`` loads none of the heavy libraries is tests/test_startup.py's.)"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qdet
from qdet.engine.presets import PRESETS
from qdet.models.registry import ARCHS, build_model, method
from qdet.weights.checkpoint import CheckpointError, model_checkpoint
from qdet.weights.loading import model_from_checkpoint

from conftest import TINY

PACKAGE = Path(qdet.__file__).parent
# what each folder may import besides itself (a new edge is added here on purpose)
ALLOWED = {
    "common": set(),
    "ops": set(),
    "blocks": {"ops"},
    "models": {"blocks", "ops", "common"},
    "data": {"common"},
    "weights": {"models", "blocks", "ops", "common"},
    "engine": {"weights", "models", "blocks", "ops", "data", "common"},
    "tools": {"engine", "weights", "models", "blocks", "ops", "data", "common"},
    "cli": {"tools", "engine", "weights", "models", "blocks", "ops", "data", "common"},
}
METHODS = {path.rsplit(".", 1)[1] for path in ARCHS.values()}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """The qdet modules that module ``name`` imports (relative or absolute); ``from pkg
    import x`` counts as importing module ``pkg.x`` when it is one."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else None    # qdet.<folder>.<module>


GRAPH = {name: imports(name) for name in MODULES}


def test_every_module_is_in_a_folder_and_folders_follow_the_layers():
    loose = [n for n in MODULES if n not in ("qdet", "qdet.__main__")
             and n.split(".")[1] not in ALLOWED]
    assert not loose, f"modules outside the folders: {loose}"
    wrong = []
    for name, targets in GRAPH.items():
        here = folder(name)
        if here is None:
            continue
        for t in targets:
            there = folder(t)
            if there is not None and there != here and there not in ALLOWED[here]:
                wrong.append(f"{name} -> {t}")
    assert not wrong, "imports against the layers: " + "; ".join(sorted(wrong))


def test_method_files_import_only_blocks_and_ops():
    for name in METHODS:
        extra = {t for t in GRAPH[f"qdet.models.{name}"] if folder(t) not in ("blocks", "ops")}
        assert not extra, f"qdet/models/{name}.py imports {sorted(extra)}"


def test_ops_import_nothing_else_of_qdet():
    for name, targets in GRAPH.items():
        if folder(name) == "ops":
            assert all(folder(t) == "ops" for t in targets), (name, targets)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_import_cycle_between_modules_or_folders():
    """Function-level imports count: a cycle hidden inside a function is still a cycle."""
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    folders: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        if folder(name):
            folders.setdefault(folder(name), set()).update(
                folder(t) for t in targets if folder(t) and folder(t) != folder(name))
    cycle = _cycle(folders)
    assert cycle is None, "import cycle between folders: " + " -> ".join(cycle)


def test_nothing_below_the_cli_imports_typer_or_rich_when_imported():
    for name, path in MODULES.items():
        if folder(name) == "cli" or name == "qdet.__main__":
            continue
        tree = ast.parse(path.read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
               for a in node.names}
        top |= {(node.module or "").split(".")[0] for node in tree.body
                if isinstance(node, ast.ImportFrom) and not node.level}
        assert not top & {"typer", "rich"}, f"{name} imports {sorted(top & {'typer', 'rich'})}"


def test_building_a_model_loads_no_training_or_terminal_code():
    code = ("import sys, qdet; qdet.build_model('detr'); "
            "print(','.join(m for m in ('pycocotools', 'rich', 'typer', 'qdet.engine.trainer', "
            "'qdet.engine.runs', 'qdet.data.datasets', 'qdet.weights.official', "
            "'qdet.engine.presets', 'qdet.common.terminal') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == ""


def test_every_method_has_a_spec_and_presets():
    for name in ARCHS:
        m = method(name)
        assert m.model.arch == name and set(PRESETS[name]) == {"paper", "shapes"}


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
