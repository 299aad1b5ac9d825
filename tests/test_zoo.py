"""The model zoo and downloads, without the internet: files are served by a real
``http.server`` on 127.0.0.1 started here (plain URLs, and the few endpoints of the Hugging
Face Hub that ``huggingface_hub`` downloads through)."""
import hashlib
import http.server
import threading

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import qdet
from qdet.cli.app import app
from qdet.models.registry import build_model
from qdet.weights import zoo
from qdet.weights.checkpoint import model_checkpoint, save_checkpoint
from qdet.weights.zoo import ZooEntry, ZooError, resolve

from conftest import TINY, random_images

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Server:
    """Files by URL path; ``drop`` paths announce their full length and send half; every
    request is counted. Hub paths (``/owner/name/resolve/main/FILE``) answer as the Hub:
    404 with X-Error-Code for unknown repositories and files, X-Repo-Commit and ETag else."""

    def __init__(self):
        self.files, self.drop, self.repos, self.requests = {}, set(), {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                server.requests.append(self.path)
                data, headers = server.lookup(self.path)
                if isinstance(data, str):       # an error code for the Hub client
                    self.send_response(404)
                    self.send_header("X-Error-Code", data)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    half = self.path in server.drop
                    self.wfile.write(data[:len(data) // 2] if half else data)
                    self.wfile.flush()
                    if half:
                        self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def lookup(self, path):
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return "RepoNotFound", {}
            if name not in self.repos[repo]:
                return "EntryNotFound", {}
            data = self.repos[repo][name]
            return data, {"X-Repo-Commit": COMMIT,
                          "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if path not in self.files:
            return "EntryNotFound", {}
        return self.files[path], {}


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QDET_HOME", str(tmp_path / "qdet"))
    return tmp_path / "qdet" / "checkpoints"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = build_model("detr", TINY["detr"]).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model_checkpoint(model))
    return model, path.read_bytes()


def entry(server, data: bytes, name="tiny-abcd1234.pth", sha=True, **kw):
    server.files["/" + name] = data
    sha256 = hashlib.sha256(data).hexdigest()[:8] if sha is True else sha
    e = ZooEntry("tiny", "detr", "R18", 1.0, url=server.url + "/" + name, file=name,
                 sha256=sha256, **kw)
    return e


def use(monkeypatch, *entries):
    monkeypatch.setattr(zoo, "ZOO", {e.name: e for e in entries})


def leftovers(home):
    return sorted(p.name for p in home.iterdir()) if home.exists() else []


def test_download_by_name_verified_then_loaded(server, home, monkeypatch, tiny_checkpoint,
                                               capsys):
    model, data = tiny_checkpoint
    use(monkeypatch, entry(server, data))
    path = resolve("tiny")
    assert path == home / "tiny-abcd1234.pth" and path.read_bytes() == data
    assert leftovers(home) == ["tiny-abcd1234.pth"]           # no temporary file left
    progress = capsys.readouterr().err
    mb = f"{len(data) / 1e6:.1f}/{len(data) / 1e6:.1f} MB"
    assert "tiny-abcd1234.pth" in progress and mb in progress    # the bar, on stderr
    loaded = qdet.load("tiny")
    with torch.no_grad():
        x = random_images([(64, 64)])
        torch.testing.assert_close(loaded(x)["pred_logits"], model(x)["pred_logits"])


def test_cache_hit_makes_no_request(server, home, monkeypatch):
    use(monkeypatch, entry(server, b"w" * 100_000))
    resolve("tiny")
    count = len(server.requests)
    server.httpd.shutdown()                          # and no server needed either
    assert resolve("tiny") == home / "tiny-abcd1234.pth"
    assert len(server.requests) == count == 1


def test_checksum_mismatch_is_refused_and_removed(server, home, monkeypatch):
    use(monkeypatch, entry(server, b"x" * 5000, sha="deadbeef"))
    with pytest.raises(ZooError, match=r"checksum mismatch \(sha256 [0-9a-f]{8}\.\.\., "
                                       r"expected deadbeef\.\.\.\), the file was deleted"):
        resolve("tiny")
    assert leftovers(home) == []


def test_dropped_connection_leaves_nothing(server, home, monkeypatch):
    data = bytes(range(256)) * 2000
    e = entry(server, data, sha=None)  # no checksum: the byte count must catch it
    server.drop.add("/" + e.file)
    use(monkeypatch, e)
    with pytest.raises(ZooError, match="stopped after .* bytes"):
        resolve("tiny")
    assert leftovers(home) == []
    server.drop.clear()                              # a later try downloads it whole
    assert resolve("tiny").read_bytes() == data


def test_no_network_is_one_line_with_the_url_and_the_path(home, monkeypatch):
    import socket

    with socket.socket() as s:                       # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = ZooEntry("tiny", "detr", "R18", 1.0, url=f"http://127.0.0.1:{port}/t-1234abcd.pth",
                 file="t-1234abcd.pth", sha256="1234abcd")
    use(monkeypatch, e)
    with pytest.raises(ZooError) as info:
        resolve("tiny")
    message = str(info.value)
    assert "\n" not in message and e.url in message and str(home / e.file) in message
    assert leftovers(home) == []


def test_by_hand_entry_says_where_to_put_the_file(home, monkeypatch, tiny_checkpoint):
    e = ZooEntry("anchor-x", "anchor", "R50", 42.1, page="https://example.org/models",
                 file="anchor-x.pth")
    use(monkeypatch, e)
    with pytest.raises(ZooError, match=f"get anchor-x.pth from https://example.org/models and "
                                       f"put it at {home / 'anchor-x.pth'}"):
        resolve("anchor-x")
    home.mkdir(parents=True)
    (home / "anchor-x.pth").write_bytes(tiny_checkpoint[1])
    assert resolve("anchor-x") == home / "anchor-x.pth"


def test_unknown_name_lists_the_closest():
    with pytest.raises(ZooError, match="closest: detr-r50, .*qdet zoo"):
        resolve("detr-r5")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve("nope.pth")


def test_zoo_table_fits_80_columns_with_nothing_cut(home):
    from qdet.cli.zoo import zoo_table

    console = Console(width=80, record=True)
    console.print(zoo_table({n: n == "detr-r50" for n in zoo.ZOO}))
    text = console.export_text()
    assert "…" not in text and max(len(line.rstrip()) for line in text.splitlines()) <= 80
    for e in zoo.ENTRIES:
        assert e.name in text
    assert "detr-r50 " in text and " yes" in text


def test_zoo_entries_are_consistent():
    for e in zoo.ENTRIES:
        assert sum(x is not None for x in (e.url, e.hf, e.page)) == 1, e.name
        assert e.method in qdet.models.registry.ARCHS and (e.hf or e.file)
        if e.sha256:  # torch.hub's rule: the hex run after the last '-' of the name
            assert e.file.rsplit("-", 1)[1].startswith(e.sha256 + ".")
        if "dc5" in e.name and e.file:  # dilation is read from the file name
            assert "dc5" in e.file.lower()


def test_cli_zoo_commands(home):
    runner = CliRunner()
    result = runner.invoke(app, ["zoo"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "detr-r101-dc5" in result.output
    result = runner.invoke(app, ["zoo", "detr-r50"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "e632da11" in result.output and str(home / "detr-r50-e632da11.pth") in result.output
    result = runner.invoke(app, ["zoo", "detr-r5"])
    assert result.exit_code == 1 and "closest: detr-r50" in result.output


# ----------------------------------------------------------------- Hugging Face Hub


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """huggingface_hub pointed at the local server, with an empty cache of its own."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return server


def hf_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_convert import backbone_kwargs

    torch.manual_seed(0)
    cfg = transformers.DetrConfig(**backbone_kwargs("hf-resnet", ["stage4"]), d_model=32,
                                  encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, num_queries=5, num_labels=3,
                                  id2label={0: "cat", 1: "dog", 2: "bird"})
    transformers.DetrForObjectDetection(cfg).save_pretrained(tmp_path / "src")
    return {n: (tmp_path / "src" / n).read_bytes() for n in ("config.json", "model.safetensors")}


def test_hub_id_downloads_through_the_hf_cache_then_works_offline(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.repos["acme/detr-tiny"] = hf_files(tmp_path)
    model = qdet.load("hf:acme/detr-tiny")
    assert model.class_names == ["cat", "dog", "bird"] and model.config.num_queries == 5
    assert str(tmp_path / "hf") in str(resolve("hf:acme/detr-tiny"))
    count = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert qdet.load("hf:acme/detr-tiny").class_names == ["cat", "dog", "bird"]
    assert len(hub.requests) == count


def test_hub_errors_are_one_line(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(ZooError, match="hf:acme/missing: no such model on the Hugging Face "
                                       "Hub"):
        resolve("hf:acme/missing")
    hub.repos["acme/no-weights"] = {"config.json": b"{}"}
    with pytest.raises(ZooError, match="has config.json but no model.safetensors or "
                                       "pytorch_model.bin"):
        resolve("hf:acme/no-weights")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ZooError) as info:
        resolve("hf:acme/other")
    assert "not in the Hugging Face cache" in str(info.value) and "\n" not in str(info.value)
