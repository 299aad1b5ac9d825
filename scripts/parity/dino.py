"""DINO against its official code (IDEA-Research/DINO), outside CI.

The official repository is built on the CPU with random weights, at the size its config
file says (R50, 4 or 5 scales, 900 queries, 6+6 layers); its state dict and ``args`` are
saved as its ``main.py`` saves a checkpoint; ``qdet.load`` reads that file and both models
run on the same padded batch of two images of different sizes, in float64 (see ``--dtype``). Compared: the final and
every decoder layer's logits and boxes, and the top-300 detections of both post-processors
(the official boxes clipped to the image, as qdet's are).

    python scripts/parity/dino.py --official PATH [--config DINO_5scale] [--size 320]

``PATH`` is a checkout of https://github.com/IDEA-Research/DINO (a ``git archive`` of it is
enough; nothing is compiled). Shims for today's torch and for a machine without CUDA, all
in this file: the compiled ``MultiScaleDeformableAttention`` is replaced by the repository's
own pure-PyTorch formulation (``ms_deform_attn_core_pytorch``), and torchvision's ResNet is
built without downloading ImageNet weights (random weights are the point).
Needs ``timm`` (the official backbone module imports it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import torch


def official_args(repo: Path, config: str, num_classes: int) -> argparse.Namespace:
    """The config file's values (and its ``_base_``'s) over ``main.py``'s defaults that the
    model builder reads, as the official ``main.py`` merges them."""
    values: dict = {}
    folder = repo / "config" / "DINO"

    def read(name):
        scope: dict = {}
        exec((folder / name).read_text(), scope)   # the config files are plain assignments
        for base in scope.pop("_base_", []):
            read(base)
        values.update({k: v for k, v in scope.items() if not k.startswith("__")})

    read(f"{config}.py")
    values.update(device="cpu", masks=False, frozen_weights=None, dataset_file="coco",
                  num_classes=num_classes, dn_labelbook_size=num_classes)
    return argparse.Namespace(**values)


def shim_official(repo: Path) -> None:
    """Import path and the shims named in the module docstring."""
    import torchvision

    sys.path.insert(0, str(repo))
    def no_download(name):
        make = getattr(torchvision.models, name)

        def build(*args, pretrained=False, **kwargs):
            kwargs.setdefault("weights", None)
            return make(*args, **kwargs)
        return build

    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        setattr(torchvision.models, name, no_download(name))

    def forward(value, shapes, start, locations, weights, step):
        from models.dino.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch
        return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    sys.modules["MultiScaleDeformableAttention"] = types.SimpleNamespace(
        ms_deform_attn_forward=forward)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, the zero-initialized heads and offsets included, and
    frozen BatchNorm statistics that are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "weight", "bias")) and b.is_floating_point():
                b.add_(torch.randn(b.shape, generator=gen) * 0.05)


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    print(f"  {name:<28} max |diff| {diff:.3g}   (values up to {scale:.3g})")
    return diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="IDEA-Research/DINO checkout")
    ap.add_argument("--config", default="DINO_4scale", help="a file in config/DINO, no .py")
    ap.add_argument("--size", type=int, default=320, help="the longer image's shorter side")
    ap.add_argument("--num-classes", type=int, default=91)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="float64 by default: in float32 two of the 900 selected proposals "
                         "whose scores differ by rounding (2e-7) can swap ranks, and each "
                         "rank has its own learned content query, so those queries differ")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="the official code builds its proposal grid in float32 even in a "
                         "float64 model: about 1e-7 relative, 1e-6 on logits of order 5")
    args = ap.parse_args()
    repo = args.official.resolve()
    shim_official(repo)
    from models.dino.dino import build_dino
    from util.misc import nested_tensor_from_tensor_list

    import qdet
    from qdet.blocks.base import postprocess
    from qdet.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = official_args(repo, args.config, args.num_classes)
    official, _criterion, post = build_dino(cfg)
    randomize(official, 1)
    dtype = getattr(torch, args.dtype)
    official.eval().to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"checkpoint0011_{args.config.split('_')[-1]}.pth"
        save_checkpoint(path, {"model": official.state_dict(), "args": cfg, "epoch": 11})
        ours = qdet.load(path).eval().to(dtype)
    print(f"{args.config}: {sum(p.numel() for p in official.parameters()):,} parameters; "
          f"qdet: {sum(p.numel() for p in ours.parameters()):,}")

    gen = torch.Generator().manual_seed(2)
    s = args.size
    images = [torch.randn(3, s, s * 4 // 3, generator=gen, dtype=dtype),
              torch.randn(3, s * 3 // 4, s, generator=gen, dtype=dtype)]
    with torch.no_grad():
        theirs = official(nested_tensor_from_tensor_list(images))
        mine = ours(images)
    worst = 0.0
    worst = max(worst, report("pred_logits", mine["pred_logits"], theirs["pred_logits"]))
    worst = max(worst, report("pred_boxes", mine["pred_boxes"], theirs["pred_boxes"]))
    for i, (m, t) in enumerate(zip(mine["aux_outputs"], theirs["aux_outputs"])):
        worst = max(worst, report(f"decoder layer {i} logits", m["pred_logits"],
                                  t["pred_logits"]))
        worst = max(worst, report(f"decoder layer {i} boxes", m["pred_boxes"],
                                  t["pred_boxes"]))
    if len(mine["aux_outputs"]) != len(theirs["aux_outputs"]):
        print("  different numbers of decoder layers")
        return 1
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images])
    dets_theirs = post["bbox"](theirs, sizes)
    dets_mine = postprocess(mine, sizes, focal=True, topk=ours.max_detections)
    for i, (m, t) in enumerate(zip(dets_mine, dets_theirs)):
        # qdet clips boxes to the image, the official post-processor does not
        h, w = sizes[i].tolist()
        t["boxes"] = t["boxes"].clamp(min=0).minimum(torch.tensor([w, h, w, h]).to(t["boxes"]))
        same = (m["labels"] == t["labels"]).float().mean().item()
        print(f"  image {i}: top-{len(t['scores'])} detections, same labels in order "
              f"{same:.1%}")
        worst = max(worst, report(f"image {i} scores", m["scores"], t["scores"]))
        worst = max(worst, report(f"image {i} boxes (px / {s})", m["boxes"] / s,
                                  t["boxes"] / s))
    ok = worst <= args.tolerance
    print(("PARITY" if ok else "MISMATCH") + f": largest difference {worst:.3g} "
          f"(tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
