#!/usr/bin/env bash
# The convergence race (docs/benchmarks.md): every method on the built-in data at one
# wall-clock budget, twice: with the training-only switches (denoising queries, query
# groups where the decoder is cheap, EMA) and with every switch off (as the presets are);
# then DINO with each of its three parts off in turn (the paper's ablation); then the
# figures and tables of docs/assets/.
#
# Run it on an otherwise idle machine (a wall-clock race is meaningless on shared cores),
# one run at a time, from the repository root with qdet installed:
#   scripts/race.sh [MINUTES] [ROOT] [PHASE]   # defaults: 10 minutes, runs/race, all
# PHASE: off (every switch off), on (the switches on), dino (the ablation), plots, or all.
# A run that finished (its per_class.csv is written last) is kept; one cut short starts
# again from scratch, since a resumed run's wall time would not be one sitting.
#
# Two environment variables split a race over the cores, for two runs side by side under
# the same conditions (e.g. a method with and without its switches, each on its own core):
#   CORES=0      pin every run to these cores (taskset), with as many threads
#   ONLY="a b"   run only the runs of these names (detr-off, detr, dino-no-contrastive, ...)
#   CORES=0 ONLY="detr-off conditional-off" scripts/race.sh 10 runs/race off &
#   CORES=1 ONLY="detr conditional" scripts/race.sh 10 runs/race on &
#   PREFIX=race   the names of the figures and tables written to docs/assets/
set -euo pipefail
MINUTES=${1:-10}
ROOT=${2:-runs/race}
PHASE=${3:-all}
PREFIX=${PREFIX:-race}
mkdir -p "$ROOT" docs/assets

PIN=()
if [ -n "${CORES:-}" ]; then
    PIN=(taskset -c "$CORES")
    THREADS=$(taskset -c "$CORES" nproc)
    export OMP_NUM_THREADS=$THREADS NUMBA_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
fi

{   # the machine, for docs/benchmarks.md
    date -u
    lscpu | grep -E "Model name|^CPU\(s\)|Thread" || true
    grep -qw avx512_bf16 /proc/cpuinfo && echo "AVX-512 BF16: yes" || echo "AVX-512 BF16: no"
    "${PIN[@]}" python -c "import torch; print('torch', torch.__version__, 'threads',
               torch.get_num_threads(), 'cuda', torch.cuda.is_available())"
    if [ -n "${CORES:-}" ]; then echo "pinned to cores $CORES, $THREADS threads"; fi
} > "$ROOT/machine${CORES:+-cores-$CORES}.txt"

race() {  # NAME QDET-TRAIN-OPTIONS...
    local name=$1; shift
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    if [ -f "$ROOT/$name/per_class.csv" ]; then
        echo "== $name: finished, kept"; return
    fi
    rm -rf "${ROOT:?}/$name"
    echo "== $name"
    "${PIN[@]}" qdet train "$@" --time "$MINUTES" --out "$ROOT/$name"
}

# name and options of each method's run (the preset's switches apply unless turned off)
METHODS=(detr conditional anchor deformable deformable-two-stage efficient sparse-rcnn
         dynamic dino)
declare -A OPTS=(
    [detr]="--arch detr" [conditional]="--arch conditional" [anchor]="--arch anchor"
    [deformable]="--arch deformable"
    [deformable-two-stage]="--arch deformable --set with_box_refine=true --set two_stage=true"
    [efficient]="--arch efficient" [sparse-rcnn]="--arch sparse-rcnn"
    [dynamic]="--arch dynamic" [dino]="--arch dino")
OFF="--dn 0 --query-groups 1 --no-ema"
# the switches: three query groups cost Sparse R-CNN and Dynamic DETR half a step more (their
# RoI heads run per query), so those two take DN and the EMA only; DINO has its own denoising
ON="--dn 5 --query-groups 3 --ema"
declare -A SWITCHES=([sparse-rcnn]="--dn 5 --ema" [dynamic]="--dn 5 --ema"
                     [dino]="--query-groups 3 --ema")

if [[ $PHASE == off || $PHASE == all ]]; then
    for m in "${METHODS[@]}"; do
        [[ $m == dino ]] && continue     # DINO's denoising is DINO: see the ablation
        # shellcheck disable=SC2086
        race "$m-off" ${OPTS[$m]} $OFF
    done
fi
if [[ $PHASE == on || $PHASE == all ]]; then
    for m in "${METHODS[@]}"; do
        # shellcheck disable=SC2086
        race "$m" ${OPTS[$m]} ${SWITCHES[$m]:-$ON}
    done
fi
if [[ $PHASE == dino || $PHASE == all ]]; then
    # shellcheck disable=SC2086
    race dino-no-contrastive --arch dino ${SWITCHES[dino]} --set dn.contrastive=false
    # shellcheck disable=SC2086
    race dino-no-mixed-selection --arch dino ${SWITCHES[dino]} --set mixed_selection=false
    # shellcheck disable=SC2086
    race dino-no-look-forward-twice --arch dino ${SWITCHES[dino]} --set look_forward_twice=false
fi

plot() {  # OUT-PREFIX RUN-NAME...
    local prefix=$1; shift
    local runs=()
    for name in "$@"; do [ -f "$ROOT/$name/metrics.jsonl" ] && runs+=("$ROOT/$name"); done
    [ ${#runs[@]} -gt 0 ] || return 0
    qdet plot "${runs[@]}" --x time --metric AP --out "docs/assets/${prefix}_time.png"
    qdet plot "${runs[@]}" --x time --metric AP50 --out "docs/assets/${prefix}_time_ap50.png" \
        --markdown > "docs/assets/${prefix}_table.md"
}
OFFS=()
for m in "${METHODS[@]}"; do [[ $m != dino ]] && OFFS+=("$m-off"); done
plot "$PREFIX" "${METHODS[@]}"
plot "${PREFIX}_off" "${OFFS[@]}"
plot "${PREFIX}_dino" dino dino-no-contrastive dino-no-mixed-selection dino-no-look-forward-twice
for f in "$ROOT"/machine*.txt; do cp "$f" "docs/assets/${PREFIX}_$(basename "$f")"; done
cat docs/assets/"${PREFIX}"_*table.md docs/assets/"${PREFIX}"_machine*.txt
