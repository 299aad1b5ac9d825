"""Benchmark (not a test): qdet against HF transformers with the same weights.

    python tests/bench_hf.py [--arch detr|deformable|conditional] [--size 800x1066]

Builds the paper configuration (ResNet-50) in HF transformers with random weights, writes
the model folder with ``save_pretrained``, loads that with ``qdet.load`` (eager and fast
path), checks the outputs agree, and times one image on the CPU: HF, qdet eager, qdet fast,
qdet fast + bf16, all in this process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_convert import randomize_  # noqa: E402

import qdet  # noqa: E402


def build(arch: str):
    from transformers import ResNetConfig

    backbone = ResNetConfig(out_features=["stage4"] if arch != "deformable"
                            else ["stage2", "stage3", "stage4"])          # ResNet-50
    if arch == "detr":
        from transformers import DetrConfig, DetrForObjectDetection

        model = DetrForObjectDetection(DetrConfig(use_timm_backbone=False,
                                                  backbone_config=backbone, num_labels=91))
    elif arch == "conditional":
        from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

        model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(
            use_timm_backbone=False, backbone_config=backbone, num_labels=91))
    else:
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

        model = DeformableDetrForObjectDetection(DeformableDetrConfig(
            use_timm_backbone=False, backbone_config=backbone, num_labels=91))
    return randomize_(model.eval())


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="detr", choices=["detr", "deformable", "conditional"])
    ap.add_argument("--size", default="800x1066")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    hf = build(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"{args.arch}-r50"
        hf.save_pretrained(folder)
        eager, fast = qdet.load(folder), qdet.load(folder, fast=True)
    x = torch.randn(1, 3, h, w)
    mask = torch.ones(1, h, w, dtype=torch.long)

    def run_hf():
        return hf(pixel_values=x, pixel_mask=mask)

    def run(model, bf16=False):
        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model([x[0]])
        return f

    with torch.inference_mode():
        ref = run_hf()
        for name, model in (("eager", eager), ("fast", fast)):
            diff = (run(model)()["pred_boxes"] - ref.pred_boxes).abs().max().item()
            print(f"qdet {name} vs HF: max |pred_boxes diff| = {diff:.2e}")
        rows = [("HF transformers", timed(run_hf, args.repeat)),
                ("qdet eager", timed(run(eager), args.repeat)),
                ("qdet fast", timed(run(fast), args.repeat)),
                ("qdet fast + bf16", timed(run(fast, True), args.repeat))]
    base = rows[0][1]
    print(f"{args.arch} R50 at {h}x{w}, batch 1, {torch.get_num_threads()} threads")
    for name, sec in rows:
        print(f"  {name:18s} {sec * 1e3:8.0f} ms   {base / sec:5.2f}x vs HF")


if __name__ == "__main__":
    main()
