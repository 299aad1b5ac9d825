#!/usr/bin/env bash
# The GPU check, for a person with a GPU machine for about 15 minutes, offline: installs qdet
# from the wheels folder that scripts/gpu_wheels.sh prepared, runs `qdet bench gpu` (the
# report lands in gpu-report.md) and then the CUDA tests without the simulator. Run it from
# a copy of the repository (with its .whl/ folder), with the Python that has torch and
# torchvision (built for the machine's CUDA), numba and numba-cuda:
#
#   scripts/gpu_check.sh [WHEELS]               # default: .whl/
#   PYTHON=/opt/venv/bin/python BENCH_ARGS=--quick scripts/gpu_check.sh
#
# Each step has a timeout, together 13 minutes at most (the bench takes about 5). Everything
# printed also goes to gpu-check.log. Exit status: 0 when the install, the bench (every kernel
# check passing) and the tests all succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-.whl}
py=${PYTHON:-python3}
log=gpu-check.log
: > "$log"
say() { echo "== $*" | tee -a "$log"; }
run() {   # run SECONDS COMMAND...: with a timeout, into the log; returns its status
    local seconds=$1
    shift
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}

say "machine"
run 20 nvidia-smi
run 60 "$py" -c "import sys, torch, numba; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'numba', numba.__version__)"

say "install qdet from $wheels/ (offline)"
if ! run 120 "$py" -m pip install --isolated --no-index --find-links "$wheels" qdet pytest; then
    say "the install failed: is $wheels/ from scripts/gpu_wheels.sh for this Python?"
    exit 1
fi
# this checkout's qdet even where an earlier one of the same version is installed
run 60 "$py" -m pip install --isolated --no-index --find-links "$wheels" --no-deps \
    --force-reinstall --quiet qdet

say "qdet bench gpu ${BENCH_ARGS:-}"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
run 360 "$py" -m qdet bench gpu --out gpu-report.md ${BENCH_ARGS:-}
bench=$?

say "the CUDA tests (no simulator)"
run 150 env -u NUMBA_ENABLE_CUDASIM "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/test_gpu.py tests/test_backends.py
tests=$?

say "bench exit $bench, tests exit $tests; report: gpu-report.md; log: $log"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
