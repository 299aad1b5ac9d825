#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, a folder of wheels that installs qdet on an
# offline GPU machine (no network: a cluster node, an air-gapped lab). That machine is
# expected to have torch and torchvision built for its CUDA, numba and numba-cuda (large,
# CUDA-specific packages a GPU machine comes with); the folder carries everything else
# qdet needs (pycocotools, scipy, matplotlib, ... with their own dependencies), pytest for
# the GPU tests, a recent setuptools (torch requires one), and qdet's own wheel. Wheels for
# CPython 3.11 and 3.12 on manylinux x86_64, whatever this machine runs.
#
#   scripts/gpu_wheels.sh [FOLDER]        # default: .whl/ (ignored by git)
#   PYTHONS="3.10 3.11 3.12" scripts/gpu_wheels.sh
#
# Then copy the repository with the folder to the GPU machine and run scripts/gpu_check.sh
# there, or by hand, with the Python that has torch:
#   python -m pip install --isolated --no-index --find-links .whl qdet
#   qdet bench gpu --out gpu-report.md
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
pythons=${PYTHONS:-"3.11 3.12"}
py=${PYTHON:-python3}
mkdir -p "$out"

# qdet's dependencies from pyproject.toml, less what the GPU machine brings
deps=$("$py" - <<'PY'
import re
text = open("pyproject.toml").read()
block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
names = re.findall(r'"([^"]+)"', block)
brought = {"torch", "torchvision", "numba"}
print(" ".join(n for n in names if re.split(r"[<>=!~ \[]", n)[0].lower() not in brought))
PY
)
# pytest for the GPU tests; setuptools because torch requires a recent one (>= 77 for torch
# 2.14), which a venv made by an older ensurepip lacks
extra="pytest setuptools"
echo "dependencies to carry: $deps $extra"

# every manylinux tag spelled out: pip does not widen one tag to the older ones
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_28_x86_64)
for version in $pythons; do
    abi="cp${version/./}"
    echo "== wheels for CPython $version ($abi)"
    "$py" -m pip download --quiet --only-binary=:all: "${platforms[@]}" \
        --python-version "$version" --implementation cp --abi "$abi" \
        --dest "$out" $deps $extra
done

echo "== qdet's own wheel"
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$out" .
ls "$out" | sed 's/^/  /'
echo "$(ls "$out" | wc -l) wheels in $out/ ($(du -sh "$out" | cut -f1))"
