"""Shared test helpers: tiny configs so the whole suite stays fast on a 2-core CPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# Per architecture: overrides that make a model small enough for CPU tests.
# A new architecture needs an entry here; tests parametrized over the registry use it.
TINY = {
    "detr": dict(backbone="resnet18", d_model=32, nheads=4, enc_layers=1, dec_layers=2,
                 dim_feedforward=64, num_queries=6, dropout=0.0, num_classes=5),
    "deformable": dict(backbone="resnet18", d_model=32, nheads=4, enc_layers=1, dec_layers=2,
                       dim_feedforward=64, num_queries=6, dropout=0.0, num_classes=5,
                       enc_n_points=2, dec_n_points=2, num_feature_levels=3),
    "conditional": dict(backbone="resnet18", d_model=32, nheads=4, enc_layers=1, dec_layers=2,
                        dim_feedforward=64, num_queries=6, dropout=0.0, num_classes=5),
    "anchor": dict(backbone="resnet18", d_model=32, nheads=4, enc_layers=1, dec_layers=2,
                   dim_feedforward=64, num_anchors=3, num_patterns=2, num_classes=5),
    "sparse-rcnn": dict(backbone="resnet18", d_model=32, nheads=4, num_heads=2,
                        dim_feedforward=64, dim_dynamic=8, num_proposals=6, num_classes=5),
    "efficient": dict(backbone="resnet18", d_model=32, nheads=4, enc_layers=1, dec_layers=2,
                      dim_feedforward=64, num_queries=6, dropout=0.0, num_classes=5,
                      enc_n_points=2, dec_n_points=2, num_feature_levels=3),
    "dynamic": dict(backbone="resnet18", d_model=32, nheads=4, num_levels=3, enc_blocks=1,
                    dec_layers=2, num_queries=6, dim_feedforward=64, dim_dynamic=8,
                    num_classes=5),
    "dino": dict(backbone="resnet18", d_model=32, nheads=4, enc_layers=1, dec_layers=2,
                 dim_feedforward=64, num_queries=6, num_classes=5, enc_n_points=2,
                 dec_n_points=2, num_feature_levels=3, **{"dn.queries": 8}),
}

# The built-in data, small: few tiny images.
TINY_SHAPES = ["--set", "shapes.train_images=16", "--set", "shapes.val_images=4",
               "--set", "shapes.image_size=64", "--batch-size", "4", "--workers", "0"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread gains nothing, and on a busy machine OpenMP's
    waiting makes each small op tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_under_cudasim(script: str) -> None:
    """Run ``script`` in a fresh interpreter under Numba's CUDA simulator (it must be set
    before numba is imported); the script prints "CUDASIM OK" when its checks pass."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "CUDASIM OK" in proc.stdout, proc.stdout + proc.stderr


def random_images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]
