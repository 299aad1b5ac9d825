"""Start-up: `qdet --help` and every command's `--help` load neither torch nor numba (they
took several seconds when they did); the package's public names still work."""
import subprocess
import sys
from pathlib import Path

import qdet

HEAVY = ("torch", "numba", "torchvision", "scipy", "pycocotools", "PIL")

# every command and group of the app, asked for its help in one fresh interpreter
CODE = f"""
import sys
from typer.testing import CliRunner
from qdet.cli.app import app

helps = [[], ["train"], ["eval"], ["predict"], ["match-debug"], ["archs"], ["data"],
         ["data", "shapes"], ["data", "check"], ["data", "convert"], ["bench"],
         ["bench", "models"], ["bench", "deform-attn"], ["bench", "matcher"], ["bench", "rcda"],
         ["bench", "deform-conv"], ["bench", "data"], ["bench", "video"], ["bench", "gpu"],
         ["bench", "switches"]]
for args in helps:
    r = CliRunner().invoke(app, [*args, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output, (args, r.output)
print(",".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         cwd=Path(qdet.__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"


def test_public_names_load_on_first_use():
    """Every name of the stable API (``qdet.__all__``) is found where ``qdet`` says, only
    when first used: ``import qdet`` loads no torch."""
    code = ("import sys, qdet; assert 'torch' not in sys.modules; "
            "assert set(qdet.ARCHS) >= {'detr', 'deformable'}; assert 'torch' not in sys.modules; "
            "print(*[f'{n}={getattr(qdet, n).__module__}' for n in qdet.__all__ if n != 'ARCHS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(qdet.__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    found = dict(item.split("=") for item in out.stdout.split())
    assert found == {n: f"qdet.{m}" for n, m in qdet._LAZY.items() if n != "ARCHS"}
    assert {"load", "detect", "fit", "explain", "export", "compare_runs",
            "write_report"} <= set(qdet.__all__)
