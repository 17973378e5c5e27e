#!/usr/bin/env bash
# Every GPU path on one GPU machine, one line per step: PASS, FAIL or SKIP (with why), then a summary.
# Not run in CI (no GPU there). Without CUDA it says so and exits 2 before anything else.
#   tools/gpu_check.sh                 # uses .venv (./run.sh setup); SGLang steps need ./run.sh setup-sglang
#   PY=path/to/python SGLANG_PY=.venv-sglang/bin/python OUT=/tmp/gpu-check tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SGLANG_PY=${SGLANG_PY:-.venv-sglang/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
mkdir -p "$OUT"
declare -a RESULTS=()

record() { RESULTS+=("$1 $2${3:+ ($3)}"); printf '%-5s %s%s\n' "$1" "$2" "${3:+ ($3)}"; }

step() {  # step NAME CMD... : runs CMD with a deadline, its output in $OUT/NAME.log
    local name=$1; shift
    if timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1; then
        record PASS "$name"
    else
        record FAIL "$name" "exit $?, see $OUT/$name.log"
    fi
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "FAIL  cuda (no NVIDIA GPU: nvidia-smi missing or it lists none); nothing else was run"
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "FAIL  cuda ($PY has no CUDA torch: run ./run.sh setup on this machine); nothing else was run"
    exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
record PASS cuda "$GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"

step gpu-tests "$PY" -m pytest -q -m gpu tests/
step learner-bf16-precision "$PY" - <<'PY'
import torch
from policies.model.loading import tiny_model
from policies.train.optim import make_optimizer
from policies.train.ppo import PPOConfig
m = tiny_model(seed=0).cuda()
opt = make_optimizer(m, PPOConfig(bf16=True))
p = next(m.parameters())
assert p.dtype == torch.bfloat16, p.dtype  # bf16 compute weights
assert all(t.dtype == torch.float32 for t in opt.masters)  # fp32 master weights
print("model", p.dtype, "masters", opt.masters[0].dtype, "attention", m.config._attn_implementation)
PY
step tiny-rl-job-cuda "$PY" -m launcher --quiet --config configs/tiny.yaml -o model.device=cuda \
    -o train.steps=2 -o "run_dir=$OUT/tiny-rl" -o data.test=null \
    -o "data.train=$("$PY" -c "from pathlib import Path; from launcher.mathdata import make_dataset; \
make_dataset(Path('$OUT/data'), n_train=24, n_test=4, n_sft=4, seed=0); print('$OUT/data/train.jsonl')")"

if [ ! -x "$SGLANG_PY" ]; then
    record SKIP sglang-server "no $SGLANG_PY: ./run.sh setup-sglang"
    record SKIP sglang-rl-job "no $SGLANG_PY"
else
    SGL_CMD="[$SGLANG_PY, -m, sglang.launch_server]"
    if [ "$GPUS" -ge 2 ]; then  # NCCL puts one rank per GPU: the learner on GPU 0, the server on GPU 1
        step sglang-rl-job-nccl "$PY" -m launcher --quiet --config configs/tiny.yaml -o model.path=smollm2 \
            -o model.device=cuda -o model.dtype=bfloat16 -o train.steps=2 -o "run_dir=$OUT/sglang-nccl" \
            -o data.test=null -o "data.train=$OUT/data/train.jsonl" -o actors.generator.backend=sglang \
            -o "actors.generator.sglang_command=$SGL_CMD" \
            -o 'actors.generator.sglang_args=[--base-gpu-id, "1", --mem-fraction-static, "0.5"]'
    else
        record SKIP sglang-rl-job-nccl "one GPU: NCCL cannot put the learner and the server on the same GPU"
    fi
    step sglang-rl-job-disk "$PY" -m launcher --quiet --config configs/tiny.yaml -o model.path=smollm2 \
        -o model.device=cuda -o model.dtype=bfloat16 -o train.steps=2 -o "run_dir=$OUT/sglang-disk" \
        -o data.test=null -o "data.train=$OUT/data/train.jsonl" -o actors.generator.backend=sglang \
        -o "actors.generator.sglang_command=$SGL_CMD" -o actors.generator.sglang_weights=disk \
        -o 'actors.generator.sglang_args=[--mem-fraction-static, "0.3"]'
fi

echo "---- summary (logs in $OUT)"
printf '%s\n' "${RESULTS[@]}"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
