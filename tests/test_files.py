"""One module writes files (qdet.common.files): atomically, and with the permissions the umask
gives any ordinary program, for every kind of file qdet writes (checkpoints, ONNX files,
downloads, config.json, CSV, PNG, JSON)."""
import http.server
import os
import stat
import threading
from pathlib import Path

import pytest

import qdet
from qdet.common.files import atomic_open, remove_stale_temporaries, write_atomic
from qdet.engine.runs import fit
from qdet.weights.zoo import download

from conftest import TINY


@pytest.fixture
def umask():
    """Set the process umask for the test (restored after)."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask):
        os.umask(mask)
    yield set_
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_written_file_gets_the_umask_permissions(tmp_path, umask, mask, expected):
    umask(mask)
    assert mode(write_atomic(tmp_path / "a.txt", "text")) == expected
    assert mode(write_atomic(tmp_path / "b.bin", b"\0\1")) == expected


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing(tmp_path):
    path = write_atomic(tmp_path / "f.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".last.pt.0123abcd.tmp").write_bytes(b"x")
    keep = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for p in keep:
        p.write_bytes(b"x")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.pt.0123abcd.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def test_every_file_of_a_run_an_export_and_a_download_is_readable_by_the_group(tmp_path,
                                                                               umask):
    """With umask 022, all of it is 0644: before, checkpoints, ONNX files and downloads were
    0600 (mkstemp's) while CSV and PNG files were 0644."""
    umask(0o022)
    out = tmp_path / "run"
    overrides = {k: v for k, v in TINY["detr"].items() if k != "num_classes"}
    fit("detr", out=str(out), device="cpu", model_overrides=overrides,
        train_overrides={"epochs": 1, "batch_size": 4, "num_workers": 0,
                         "shapes.train_images": 4, "shapes.val_images": 2,
                         "shapes.image_size": 64})
    qdet.export(qdet.load(out / "best.pt"), out / "model.onnx", check=False)
    served = tmp_path / "served"
    served.mkdir()
    (served / "w.bin").write_bytes(b"weights" * 100)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        download(f"http://127.0.0.1:{server.server_port}/w.bin", out / "w.bin")
    finally:
        server.shutdown()
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"best.pt", "last.pt", "config.json", "metrics.jsonl", "results.csv", "curves.png",
            "per_class.csv", "model.onnx", "w.bin"} <= names, names
    assert {p.name: oct(mode(p)) for p in files if mode(p) != 0o644} == {}
