"""Fuzzing the COCO input (issue 18): a small valid dataset, a few hundred seeded random
mutations of its JSON and its image files, and for each the data check (`qdet data check`)
and, where the check passes, one training step (``engine.step.train_step`` on the real
DataLoader path, inside the training loop's error handling; a tiny DETR with lr 0, so every
case meets the same weights). A sample of the passing cases, one per kind of mutation, runs
the whole `qdet train` instead.

Every case must end in one of two ways: it trains, or it stops with one `error:` line that
names the annotation file (or the image) and the entry. Never a traceback, never a hang (each
case has a time limit), never a file written outside the run folder (the whole tree is
compared before and after). `python tests/test_fuzz_data.py` prints the table in docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from qdet.cli.app import app  # noqa: E402
from qdet.data.datasets import CocoDataset  # noqa: E402
from qdet.data.transforms import AugmentConfig
from qdet.engine.config import TrainConfig
from qdet.engine.faults import stopping_clearly  # noqa: E402
from qdet.engine.optim import make_optimization
from qdet.engine.step import train_step  # noqa: E402
from qdet.engine.trainer import epoch_loader  # noqa: E402
from qdet.models.registry import build_model  # noqa: E402

from conftest import TINY  # noqa: E402

CASES = 300
SEED = 18
TIME_LIMIT = 60          # seconds per case; a hang fails the case
FULL_RUNS = 4            # passing cases that run the whole `qdet train`

FILES = {"a.png": (32, 32), "b.jpg": (40, 28), "c.png": (28, 36), "d.jpg": (32, 32)}


def base_dataset() -> dict:
    images = [{"id": i + 1, "file_name": name, "width": w, "height": h}
              for i, (name, (w, h)) in enumerate(FILES.items())]
    anns = [{"id": k + 1, "image_id": k % 4 + 1, "category_id": (1, 4, 7)[k % 3],
             "bbox": [2 + k, 3, 12, 10], "area": 120, "iscrowd": 0} for k in range(6)]
    cats = [{"id": 1, "name": "square"}, {"id": 4, "name": "blob"}, {"id": 7, "name": "line"}]
    return {"images": images, "annotations": anns, "categories": cats}


def write_images(folder: Path) -> None:
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in FILES.items():
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name, quality=90)


# ------------------------------------------------------------------------ mutations

SECTIONS = ("images", "annotations", "categories")
ODD_VALUES = [None, True, "7", "", "x]", [1], {"a": 1}, -1, 0, 1.5, float("nan"),
              float("inf"), -float("inf"), 1e308, -1e308, 10 ** 400, 1e-300, "NaN"]
BAD_NAMES = ["../x.png", "/etc/hostname", "sub/../../x.png", "\ud800.png", "a\u0000.png", "",
             "x" * 300 + ".png", "[bold]a.png", "./a.png", "猫.png", "ａ.png", 42, None]


class Case:
    """One dataset to break: its JSON (as a dict, or raw bytes) and its folder."""

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        self.folder = root / "images"
        self.folder.mkdir(parents=True)
        write_images(self.folder)
        (root / "x.png").write_bytes((self.folder / "a.png").read_bytes())  # traversal bait
        self.data, self.raw = base_dataset(), None

    def entry(self, section=None):
        section = section or self.rng.choice(SECTIONS)
        entries = self.data[section]
        return section, self.rng.randrange(len(entries)), entries

    def image_file(self) -> Path:
        return self.folder / self.rng.choice(sorted(FILES))

    def write(self) -> Path:
        ann = self.root / "ann.json"
        if self.raw is not None:
            ann.write_bytes(self.raw)
        else:
            ann.write_text(json.dumps(self.data))
        return ann


def drop_field(c: Case):
    section, i, entries = c.entry()
    key = c.rng.choice(sorted(entries[i]))
    del entries[i][key]


def drop_section(c: Case):
    del c.data[c.rng.choice(SECTIONS)]


def empty_section(c: Case):
    c.data[c.rng.choice(SECTIONS)] = []


def retype_field(c: Case):
    section, i, entries = c.entry()
    key = c.rng.choice(sorted(entries[i]))
    entries[i][key] = c.rng.choice(ODD_VALUES)


def bad_number(c: Case):
    """NaN, inf, huge, negative, tiny numbers in boxes and sizes."""
    value = c.rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 10 ** 400,
                          10 ** 30, -5, 0, 1e-300, -0.0])
    if c.rng.random() < 0.6:
        _, i, anns = c.entry("annotations")
        anns[i]["bbox"][c.rng.randrange(4)] = value
    else:
        _, i, images = c.entry("images")
        images[i][c.rng.choice(["width", "height"])] = value


def box_shape(c: Case):
    """Boxes outside the image, of negative size, or not four numbers."""
    _, i, anns = c.entry("annotations")
    anns[i]["bbox"] = c.rng.choice([[100, 100, 5, 5], [5, 5, -3, 4], [-50, -50, 10, 10],
                                    [1, 2, 3], [1, 2, 3, 4, 5], "1,2,3,4", [], [[1, 2, 3, 4]]])
    if c.rng.random() < 0.3:
        for a in anns:
            a["bbox"] = [200, 200, 1, 1]


def duplicate_id(c: Case):
    section, i, entries = c.entry()
    j = (i + 1) % len(entries)
    entries[j]["id"] = entries[i]["id"]


def unknown_reference(c: Case):
    _, i, anns = c.entry("annotations")
    key = c.rng.choice(["image_id", "category_id"])
    anns[i][key] = c.rng.choice([99, -1, 0, "1", [1], None])


def file_name(c: Case):
    """Path traversal, absolute, unencodable, NUL, empty, too long, unicode names."""
    _, i, images = c.entry("images")
    name = c.rng.choice(BAD_NAMES)
    if name in ("猫.png", "ａ.png", "./a.png", "[bold]a.png") and c.rng.random() < 0.7:
        old = c.folder / images[i]["file_name"]
        os.replace(old, c.folder / name)   # the file is there: a valid case
    images[i]["file_name"] = name


def wrong_size(c: Case):
    _, i, images = c.entry("images")
    images[i]["width"] += c.rng.choice([-1, 1, 100])


def truncate_file(c: Case):
    path = c.image_file()
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * c.rng.choice([0.0, 0.05, 0.3, 0.7, 0.95]))])


def non_image(c: Case):
    c.image_file().write_bytes(c.rng.choice([b"", b"hello", b"\x89PNG\r\n\x1a\n garbage",
                                             b"\xff\xd8\xff garbage", os.urandom(200)]))


def dangling_symlink(c: Case):
    path = c.image_file()
    path.unlink()
    target = c.rng.choice([c.root / "nowhere.png", path])  # to nowhere, or a loop
    os.symlink(target, path)


def missing_or_folder(c: Case):
    path = c.image_file()
    path.unlink()
    if c.rng.random() < 0.5:
        path.mkdir()


def huge_image(c: Case):
    from test_data_errors import huge_png

    path = c.image_file()
    path.unlink()
    huge_png(path.with_suffix(".png"))
    for im in c.data["images"]:
        if im["file_name"] == path.name:
            im["file_name"], im["width"], im["height"] = path.with_suffix(".png").name, 20000, 20000


def odd_but_valid(c: Case):
    """What real datasets hold and training must take: optional fields left out, extra
    fields, boxes partly outside the image, crowd boxes, unicode class names, files renamed
    to unicode or bracketed names, integral float sizes."""
    what = c.rng.randrange(7)
    _, i, entries = c.entry(["annotations", "images", "annotations", "categories", "images",
                             "annotations", "images"][what])
    if what == 0:
        for key in ("id", "area", "iscrowd"):
            entries[i].pop(key, None)
    elif what == 1:
        entries[i].pop("width"), entries[i].pop("height")
        entries[i]["license"], entries[i]["date_captured"] = 3, "2020-01-01 00:00:00"
    elif what == 2:
        x, y, w, h = entries[i]["bbox"]
        entries[i]["bbox"] = [x - 20, y - 20, w + 100, h + 100]
    elif what == 3:
        entries[i]["name"] = c.rng.choice(["猫", "chat noir", "[x] y", "", "a\tb"])
    elif what == 4:
        name = c.rng.choice(["猫 é.png", "[bold]a.png", "with space.png", "sub/dir/a.png"])
        (c.folder / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(c.folder / entries[i]["file_name"], c.folder / name)
        entries[i]["file_name"] = name
    elif what == 5:
        entries[i]["iscrowd"], entries[i]["segmentation"] = 1, {"counts": "x", "size": [1, 1]}
    else:
        entries[i]["width"], entries[i]["height"] = (float(entries[i]["width"]),
                                                     float(entries[i]["height"]))


def broken_json(c: Case):
    text = json.dumps(c.data).encode()
    c.raw = c.rng.choice([text[:len(text) // 2], b"\xff\xfe" + text, b"[1, 2, 3]", b"null",
                          text.replace(b'"images"', b'"images"', 1) + b"}", b"",
                          b'{"images": [], "annotations": NaN, "categories": []}'])


MUTATIONS = {f.__name__.replace("_", " "): f for f in (
    drop_field, drop_section, empty_section, retype_field, bad_number, box_shape, duplicate_id,
    unknown_reference, file_name, wrong_size, truncate_file, non_image, dangling_symlink,
    missing_or_folder, huge_image, broken_json, odd_but_valid)}


# ---------------------------------------------------------------------- running them


@contextlib.contextmanager
def time_limit(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tree(root: Path) -> dict:
    """Every path under ``root`` with what identifies its content (a folder by its kind
    alone: what is written into it shows as a new path)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[Path(dirpath) / name] = (os.lstat(Path(dirpath) / name).st_mode,)
        for name in files:
            st = os.lstat(Path(dirpath) / name)
            out[Path(dirpath) / name] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


ENTRY = re.compile(r"\b(images|annotations|categories)\b|not valid JSON|cannot be parsed|"
                   r"UTF-8|expected a JSON object")


def refused(line: str, ann: Path) -> str:
    """The kind of a one-line refusal, after checking it names the file and the entry."""
    assert line.startswith("error: ") and str(ann) in line and ENTRY.search(line), line
    for kind, words in [
        ("JSON unreadable", ("not valid JSON", "cannot be parsed", "UTF-8", "a JSON object")),
        ("section missing or empty", ("missing the list", "is empty")),
        ("field missing", ("lacks field",)),
        ("image: a symlink to nowhere", ("a symlink to nowhere",)),
        ("image: over the pixel limit", ("too large",)),
        ("image: not a file", ("(not a file)",)),
        ("image: missing", ("(missing)",)),
        ("image: unreadable", ("(unreadable",)),
        ("image unreadable once decoded", ("found while training",)),
        ("file name refused", ("file_name",)),
        ("duplicate id", ("appears twice",)),
        ("unknown id", ("refers to image id", "which is not in 'categories'")),
        ("size differs from the file", ("in the JSON but",)),
        ("no box left", ("degenerate",)),
        ("wrong type or value", ("must be", "reaches past"))]:
        if any(w in line for w in words):
            return f"refused: {kind}"
    raise AssertionError(f"unclassified refusal: {line}")


class Stepper:
    """One training step of the engine on a dataset; a tiny DETR per number of classes, lr 0
    so the weights never change between cases."""

    def __init__(self):
        self.cfg = TrainConfig(lr=0.0, lr_backbone=0.0, batch_size=4, num_workers=0,
                               augment=AugmentConfig(train_scales=(32,), max_size=64,
                                                     crop=False, eval_size=32))
        self.models = {}

    def __call__(self, ann: Path, folder: Path, run: Path) -> None:
        dataset = CocoDataset(ann, folder, self.cfg.augment, train=True)
        k = len(dataset.category_ids)
        if k not in self.models:
            torch.manual_seed(0)
            model = build_model("detr", {**TINY["detr"], "num_classes": k})
            self.models[k] = (model, make_optimization(model, self.cfg, 1, torch.device("cpu"),
                                                       None))
        model, opt = self.models[k]
        model.train()
        loader = epoch_loader(dataset, None, self.cfg, 0, torch.device("cpu"))
        with stopping_clearly(0, 1, run):
            images, targets = next(iter(loader))
            train_step(model, model, opt, [(images, targets)], self.cfg, False,
                       "epoch 1, step 0")


def full_run(ann: Path, folder: Path, run: Path):
    args = ["train", "--data", str(ann), "--images", str(folder), "--out", str(run),
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-bf16",
            "--set", "augment.train_scales=32", "--set", "augment.max_size=64",
            "--set", "augment.crop=false", "--set", "augment.eval_size=32"]
    for key, value in TINY["detr"].items():
        if key != "num_classes":
            args += ["--set", f"{key}={value}"]
    return CliRunner().invoke(app, args)


def pick(rng: random.Random) -> str:
    """A mutation: one in four keeps the dataset valid (as most real quirks do)."""
    if rng.random() < 0.25:
        return "odd but valid"
    return rng.choice(sorted(set(MUTATIONS) - {"odd but valid"}))


def run_case(i: int, root: Path, stepper: Stepper, full_done: set) -> tuple[str, str]:
    """(mutation, outcome) of case ``i``; asserts the outcome is one of the allowed ones.
    The first passing case of each kind of mutation (up to FULL_RUNS) runs `qdet train`."""
    rng = random.Random(SEED * 100_000 + i)
    case = Case(root / f"case{i:03d}", rng)
    names = [pick(rng) for _ in range(1 if rng.random() < 0.8 else 2)]
    for name in names:
        try:
            MUTATIONS[name](case)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError):
            pass  # the first mutation removed what the second would change: one is enough
    ann, run = case.write(), case.root / "run"
    before = tree(root)
    with time_limit(TIME_LIMIT), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a dropped box is a warning; it is not the outcome
        r = CliRunner().invoke(app, ["data", "check", str(ann), "--images", str(case.folder)])
        assert r.exit_code in (0, 1), (names, r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), (names, r.exception)
        lines = [line for line in r.output.splitlines() if not line.startswith("warning: ")]
        full = (r.exit_code == 0 and len(names) == 1 and names[0] not in full_done
                and len(full_done) < FULL_RUNS)
        if r.exit_code == 1:
            assert len(lines) == 1, (names, r.output)
            outcome = refused(lines[0], ann)
        elif full:
            full_done.add(names[0])
            r = full_run(ann, case.folder, run)
            said = [line for line in r.output.splitlines() if line.startswith("error:")]
            assert r.exit_code in (0, 1), (names, r.output, r.exception)
            assert r.exception is None or isinstance(r.exception, SystemExit), \
                (names, r.output, r.exception)
            if r.exit_code == 1:
                assert len(said) == 1, (names, r.output)
                outcome = refused(said[0], ann).replace("refused", "stopped in qdet train")
            else:
                outcome = "trained (qdet train)"
        else:
            try:
                stepper(ann, case.folder, run)
                outcome = "trained (one step)"
            except Exception as e:  # noqa: BLE001 - the message is what is checked
                message = str(e)
                assert "\n" not in message and type(e).__name__ in ("BadImage", "DataError"), \
                    (names, type(e).__name__, message)
                outcome = refused(f"error: {message}", ann).replace("refused", "stopped in "
                                                                              "training")
    after = tree(root)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    outside = sorted(str(p) for p in changed if run not in p.parents and p != run)
    assert not outside, (names, outside)
    shutil.rmtree(case.root)  # the tree stays small to compare, and checkpoints go
    return " + ".join(names), outcome


def fuzz(root: Path, cases: int = CASES) -> Counter:
    stepper, counts, full_done = Stepper(), Counter(), set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small gain nothing from more, and lose under load
    try:
        for i in range(cases):
            mutation, outcome = run_case(i, root, stepper, full_done)
            counts[(mutation.split(" + ")[0] if " + " not in mutation else "two at once",
                    outcome)] += 1
    finally:
        torch.set_num_threads(threads)
    return counts


def table(counts: Counter) -> str:
    kinds = sorted({k for k, _ in counts})
    rows = ["| mutation | cases | outcomes |", "| --- | --- | --- |"]
    for kind in kinds:
        here = {o: n for (k, o), n in counts.items() if k == kind}
        rows.append(f"| {kind} | {sum(here.values())} | "
                    + ", ".join(f"{o}: {n}" for o, n in sorted(here.items())) + " |")
    by_outcome = Counter()
    for (_, o), n in counts.items():
        by_outcome[o.split(":")[0]] += n
    rows.append(f"| all | {sum(counts.values())} | "
                + ", ".join(f"{o}: {n}" for o, n in sorted(by_outcome.items())) + " |")
    return "\n".join(rows)


def test_fuzz_coco_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # anything written to the working directory is caught too
    counts = fuzz(tmp_path)
    print(f"\n{sum(counts.values())} mutated datasets:\n{table(counts)}")
    outcomes = Counter(o.split(" (")[0].split(":")[0] for (_, o) in counts.elements())
    assert sum(counts.values()) == CASES
    # both ways of ending are exercised, and training is reached by a fair share
    assert outcomes["trained"] >= CASES // 10 and outcomes["refused"] >= CASES // 3, outcomes


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        print(table(fuzz(Path(tmp), int(sys.argv[1]) if len(sys.argv) > 1 else CASES)))
