#!/usr/bin/env bash
# The convergence race (docs/benchmarks.md): every method on the built-in data
# with its default preset at one wall-clock budget, plus Deformable DETR's two-stage variant
# with box refinement; then the figures and table of docs/assets/.
#
# Run it on an otherwise idle machine (a wall-clock race is meaningless on shared cores),
# one run at a time, from the repository root with qdet installed:
#   scripts/race.sh [MINUTES] [ROOT]        # defaults: 10 minutes, runs/race
# A run that finished (its per_class.csv is written last) is kept; one cut short starts
# again from scratch, since a resumed run's wall time would not be one sitting.
set -euo pipefail
MINUTES=${1:-10}
ROOT=${2:-runs/race}
mkdir -p "$ROOT" docs/assets

{   # the machine, for docs/benchmarks.md
    date -u
    lscpu | grep -E "Model name|^CPU\(s\)|Thread" || true
    grep -qw avx512_bf16 /proc/cpuinfo && echo "AVX-512 BF16: yes" || echo "AVX-512 BF16: no"
    python -c "import torch; print('torch', torch.__version__, 'threads',
               torch.get_num_threads(), 'cuda', torch.cuda.is_available())"
} > docs/assets/race_machine.txt

race() {  # NAME QDET-TRAIN-OPTIONS...
    local name=$1; shift
    if [ -f "$ROOT/$name/per_class.csv" ]; then
        echo "== $name: finished, kept"; return
    fi
    rm -rf "${ROOT:?}/$name"
    echo "== $name"
    qdet train "$@" --time "$MINUTES" --out "$ROOT/$name"
}

NAMES=(detr deformable conditional anchor sparse-rcnn efficient dynamic deformable-two-stage)
race detr --arch detr
race deformable --arch deformable
race conditional --arch conditional
race anchor --arch anchor
race sparse-rcnn --arch sparse-rcnn
race efficient --arch efficient
race dynamic --arch dynamic
race deformable-two-stage --arch deformable --set with_box_refine=true --set two_stage=true

RUNS=("${NAMES[@]/#/$ROOT/}")
qdet plot "${RUNS[@]}" --x time --metric AP --out docs/assets/race_time.png
qdet plot "${RUNS[@]}" --x images --metric AP --out docs/assets/race_images.png
qdet plot "${RUNS[@]}" --x time --metric AP50 --out docs/assets/race_time_ap50.png --markdown \
    > docs/assets/race_table.md
cat docs/assets/race_table.md docs/assets/race_machine.txt
