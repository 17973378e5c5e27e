#!/usr/bin/env bash
# Run on a machine WITH network: fetches the wheels tools/gpu_check.sh needs for Python 3.12 on x86_64
# Linux into .gpu-wheels/ (git-ignored; carry it to the GPU machine). Never torch, CUDA, CuPy or numpy:
# the GPU machine has its own. Prints the folder's size (tens of MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEST=${DEST:-.gpu-wheels}
mkdir -p "$DEST"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform linux_x86_64 --platform any)
reqs=$(grep -v '^\s*#' tools/gpu_check/wheels.txt | grep -v '^\s*$')
# shellcheck disable=SC2086
"$PY" -m pip download --dest "$DEST" --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${plat[@]}" $reqs
# whatever pulled torch, CUDA, cupy or numpy in as a dependency goes: the GPU machine has them
rm -f "$DEST"/torch-* "$DEST"/nvidia_* "$DEST"/cupy* "$DEST"/numpy-* "$DEST"/triton-*
du -sh "$DEST"
