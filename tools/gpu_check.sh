#!/usr/bin/env bash
# Every GPU path on one GPU machine WITHOUT network, with that machine's own Python 3.12, CUDA torch,
# and NCCL. What it lacks comes from .gpu-wheels/ (tools/gpu_check/download_wheels.sh, run
# beforehand where there is network; carry the folder along). One line per step: PASS, FAIL or SKIP,
# each step bounded (STEP_S, 120 s), the whole run too (TOTAL_S, 450 s); every log goes into ONE
# tarball, $OUT/gpu-check.tgz.
#   tools/gpu_check.sh                       # PY=python3, OUT=a new /tmp folder
#   PY=/usr/bin/python3.12 OUT=$OUT tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
STEP_S=${STEP_S:-120}
TOTAL_S=${TOTAL_S:-450}
WHEELS=${WHEELS:-.gpu-wheels}
LOGS=$(mktemp -d /tmp/gpu-check-logs.XXXXXX)
ENV=$LOGS/venv
START=$SECONDS
mkdir -p "$OUT"
declare -a RESULTS=()

record() { RESULTS+=("$1 $2${3:+ ($3)}"); printf '%-5s %s%s\n' "$1" "$2" "${3:+ ($3)}"; }

finish() {
    { echo "---- summary"; printf '%s\n' "${RESULTS[@]}"; } | tee "$LOGS/summary.txt"
    rm -rf "$ENV"  # the venv stays here; logs and run dirs go back
    tar czf "$OUT/gpu-check.tgz" -C "$LOGS" . 2>/dev/null
    echo "logs: $OUT/gpu-check.tgz"
}
trap finish EXIT

step() {  # step NAME CMD... : CMD bounded by min(STEP_S, what is left of TOTAL_S), output in NAME.log
    local name=$1; shift
    local left=$((TOTAL_S - (SECONDS - START)))
    local limit=$((left < STEP_S ? left : STEP_S))
    if [ "$limit" -lt 15 ]; then
        record SKIP "$name" "only ${left}s of ${TOTAL_S}s left"
        return
    fi
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        record PASS "$name" "$((SECONDS - t0))s"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record FAIL "$name" "timed out after ${limit}s; $name.log: $(tail -n 1 "$LOGS/$name.log" | cut -c1-200)"
    else
        record FAIL "$name" "exit $rc; $name.log: $(tail -n 1 "$LOGS/$name.log" | cut -c1-200)"
    fi
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    record FAIL cuda "no NVIDIA GPU: nvidia-smi missing or it lists none; nothing else was run"
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >"$LOGS/cuda.log" 2>&1; then
    record FAIL cuda "$PY has no CUDA torch (cuda.log); nothing else was run"
    exit 2
fi

# A venv over the machine's own packages (its torch, NCCL, numpy) plus what .gpu-wheels holds
# and it lacks: nothing is downloaded.
setup_env() {
    "$PY" -m venv --system-site-packages "$ENV" || return 1
    [ -d "$WHEELS" ] || { echo "no $WHEELS: run tools/gpu_check/download_wheels.sh where there is network"; return 1; }
    # shellcheck disable=SC2046
    "$ENV/bin/python" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation \
        $(grep -v '^\s*#' tools/gpu_check/wheels.txt | grep -v '^\s*$') || return 1
    "$ENV/bin/python" -c "import torch, zmq, transformers, httpx2, math_verify; print('env ok, torch', torch.__version__)"
}
step env setup_env
VPY=$ENV/bin/python
[ -x "$VPY" ] || VPY=$PY
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

step versions "$VPY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", ".".join(map(str, torch.cuda.nccl.version())))
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
step fsdp2-nccl-1rank-vs-alone "$VPY" tools/gpu_check/fsdp_vs_alone.py
step weight-group-nccl-1rank "$VPY" tools/gpu_check/weight_group.py
step ranks-nccl-1rank "$VPY" -m pytest -q -p no:cacheprovider -m gpu tests/test_tensors_gpu.py

DATA=$LOGS/data
"$VPY" -c "from pathlib import Path; from launcher.mathdata import make_dataset; \
make_dataset(Path('$DATA'), n_train=24, n_test=4, n_sft=4, seed=0)" >"$LOGS/data.log" 2>&1 \
    || record FAIL data "the tiny dataset could not be made (data.log)"
job=(-m launcher --quiet --config configs/tiny.yaml -o model.device=cuda -o train.steps=2 -o data.test=null
     -o "data.train=$DATA/train.jsonl" -o bus.heartbeat_interval=1.0)
# the learner on CUDA, a fake SGLang (CPU) as the generator; weights by disk (a second NCCL rank on the
# only GPU is what NCCL refuses: the weight group on nccl is the step above)
step fake-sglang-job-cuda "$VPY" "${job[@]}" -o "run_dir=$LOGS/fake-sglang" -o actors.generator.backend=sglang \
    -o "actors.generator.sglang_command=[$VPY, $PWD/tests/fake_sglang.py]" -o actors.generator.sglang_weights=disk \
    -o 'actors.generator.sglang_args=[--token-delay, "0.001"]' -o actors.generator.sglang_health_timeout=60
step tiny-rl-job-cuda "$VPY" "${job[@]}" -o "run_dir=$LOGS/tiny-rl"

! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
