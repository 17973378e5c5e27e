"""One torch, hence one NCCL, for the learner and the SGLang servers: the committed lock of both
environments (gpu-lock.json) agrees, the checks name both versions, and run.sh installs the locked torch
on a GPU machine (a CUDA 12 torch on a CUDA 12 driver), read offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.job import gpu_env
from launcher.job.gpu_env import ParityError

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_lock_has_one_nccl_and_the_checks_name_both_versions(tmp_path):
    lock = gpu_env.load_lock()
    gpu_env.lock_parity(lock)
    learner, server = (lock["environments"][e]["pins"] for e in ("learner", "sglang"))
    assert learner["torch"] == server["torch"] and learner["nvidia-nccl-cu13"] == server["nvidia-nccl-cu13"]
    # SGLang's own metadata pins the torch the lock gives both sides
    from importlib.metadata import PackageNotFoundError, requires, version
    try:
        assert version("sglang") == server["sglang"]
        assert f"torch=={server['torch']}" in requires("sglang")
    except PackageNotFoundError:
        pass
    # yesterday's pair: the learner on torch 2.13.0 (NCCL 2.29.7), the server on 2.14.1 (NCCL 2.30.7)
    bad = json.loads(json.dumps(lock))
    bad["environments"]["learner"]["pins"].update({"torch": "2.13.0", "nvidia-nccl-cu13": "2.29.7"})
    with pytest.raises(ParityError, match=r"^gpu-lock.json: the learner pins torch 2.13.0, the SGLang server 2.14.1"):
        gpu_env.lock_parity(bad)
    with pytest.raises(ParityError, match=r"^NCCL mismatch: the learner's torch 2.13.0\+cu130 has NCCL 2.29.7, the "
                                          r"SGLang server's \(S\) torch 2.14.1 has NCCL 2.30.7"):
        gpu_env.check_parity({"torch": "2.13.0+cu130", "nccl": "2.29.7"}, {"torch": "2.14.1", "nccl": "2.30.7"}, "S")
    gpu_env.check_parity({"torch": "2.14.1", "nccl": "2.30.7"}, {"torch": "2.14.1+cu130", "nccl": "2.30.7"}, "S")
    gpu_env.check_installed("learner", {"torch": "2.14.1+cu130", "nccl": "2.30.7"}, lock)
    with pytest.raises(ParityError, match=r"^the sglang environment has torch 2.13.0, gpu-lock.json pins 2.14.1"):
        gpu_env.check_installed("sglang", {"torch": "2.13.0", "nccl": "2.29.7"}, lock)
    # the launch-time probe of another interpreter, and one that has no torch
    fake = tmp_path / "py"
    fake.write_text('#!/bin/sh\necho \'{"torch": "2.14.1", "nccl": "2.30.7"}\'\n')
    fake.chmod(0o755)
    assert gpu_env.probe(str(fake)) == {"torch": "2.14.1", "nccl": "2.30.7"}
    (tmp_path / "nopy").write_text("#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2; exit 1\n")
    (tmp_path / "nopy").chmod(0o755)
    with pytest.raises(ParityError, match="nopy: cannot import torch.*ModuleNotFoundError"):
        gpu_env.probe(str(tmp_path / "nopy"))


FAKE_PY = """#!/bin/bash
echo "py $*" >> "$FAKE_LOG"
case "$1" in
  -m) [ "$2" = venv ] && mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0 ;;
  *gpu_env.py) case "$2" in pin|check-lock) exec "$REAL_PY" "$@" ;; esac; exit 0 ;;
esac
exit 0
"""


def _setup(tmp_path, cuda: str, what: str = "setup") -> tuple[int, str, str]:
    bin_ = tmp_path / f"bin{cuda}"
    bin_.mkdir(exist_ok=True)
    (bin_ / "nvidia-smi").write_text(f'#!/bin/sh\n[ "$1" = -L ] && echo "GPU 0: NVIDIA H100" && exit 0\n'
                                     f'echo "| NVIDIA-SMI 580.1   Driver Version: 580.1   CUDA Version: {cuda}.0 |"\n')
    (bin_ / "python3").write_text(FAKE_PY)
    for f in bin_.iterdir():
        f.chmod(0o755)
    log = tmp_path / f"log{cuda}{what}"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_LOG": str(log), "REAL_PY": sys.executable,
           "VENV": str(tmp_path / f"venv{cuda}"), "SGLANG_VENV": str(tmp_path / f"sgl{cuda}"),
           "PYTHON": str(bin_ / "python3")}
    done = subprocess.run(["bash", str(ROOT / "run.sh"), what], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, log.read_text() if log.exists() else "", done.stderr


def test_run_sh_installs_the_locked_torch_for_the_learner_and_the_server(tmp_path):
    torch = gpu_env.load_lock()["environments"]["learner"]["pins"]["torch"]
    rc, log, err = _setup(tmp_path, "12")
    assert rc == 0, err
    assert f"install --index-url https://download.pytorch.org/whl/cu128 torch=={torch}" in log
    assert "-e .[test]" in log and "torch==2.13.0" not in log and "cupy" not in log
    rc, log, err = _setup(tmp_path, "13")
    assert rc == 0, err
    assert f"install torch=={torch}" in log and "-e .[test]" in log
    assert "gpu_env.py check-env learner" in log
    rc, log, err = _setup(tmp_path, "13", "setup-sglang")
    assert rc == 0, err
    assert f"install sglang==0.5.23 torch=={torch}" in log and "gpu_env.py check-env sglang" in log
    rc, _, err = _setup(tmp_path, "12", "setup-sglang")
    assert rc == 1 and "sglang 0.5.23 needs a CUDA 13 driver" in err
