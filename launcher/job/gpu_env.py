"""One NCCL for the learner and the SGLang servers: the committed lock of both environments' pins
(gpu-lock.json) and the checks that compare them.

NCCL refuses a communicator whose members run different versions ("Mismatched NCCL version", patch
included), so a learner on one torch and servers on another lose every weight update. SGLang 0.5.23
pins torch 2.14.1, so the learner's GPU environment gets the same torch (hence the same
nvidia-nccl-cu13): `lock_parity` holds the committed lock to that (CI), `check_installed` an
environment to its lock entry (./run.sh set-up), `check_parity` the learner's and the server's probed
versions (the launcher, before it starts a GPU job with launched servers). Standard library only:
run.sh runs it as a file in either environment (`python launcher/job/gpu_env.py ...`).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[2] / "gpu-lock.json"
PROBE = ("import json, torch\n"
         "try:\n    nccl = '.'.join(map(str, torch.cuda.nccl.version()))\n"
         "except Exception:\n    nccl = None\n"
         "print(json.dumps({'torch': torch.__version__, 'nccl': nccl}))")


class ParityError(ValueError):
    """Two environments that would not form one NCCL communicator; one line naming both versions."""


def load_lock(path: str | Path = LOCK) -> dict:
    try:
        lock = json.loads(Path(path).read_text())
        lock["environments"]["learner"]["pins"], lock["environments"]["sglang"]["pins"], lock["must_match"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ParityError(f"{path}: not a GPU lock ({type(e).__name__}: {e})") from None
    return lock


def lock_parity(lock: dict) -> None:
    """The pins NCCL depends on are equal in both environments."""
    a, b = lock["environments"]["learner"]["pins"], lock["environments"]["sglang"]["pins"]
    for name in lock["must_match"]:
        if a.get(name) != b.get(name):
            raise ParityError(f"gpu-lock.json: the learner pins {name} {a.get(name)}, the SGLang server "
                              f"{b.get(name)}: one NCCL needs one {name} in both environments")


def base_version(v: str | None) -> str | None:
    """'2.14.1+cu130' -> '2.14.1' (a local build tag names the CUDA, not another torch)."""
    return v.split("+", 1)[0] if v else v


def check_installed(env: str, found: dict, lock: dict) -> None:
    """An environment's probed torch against its lock entry (run.sh after installing)."""
    want = lock["environments"][env]["pins"]
    if base_version(found.get("torch")) != want["torch"]:
        raise ParityError(f"the {env} environment has torch {found.get('torch')}, gpu-lock.json pins "
                          f"{want['torch']}: reinstall it (./run.sh {'setup-sglang' if env == 'sglang' else 'setup'})")
    nccl = next((v for k, v in want.items() if k.startswith("nvidia-nccl")), None)
    if found.get("nccl") and nccl and found["nccl"] != nccl:
        raise ParityError(f"the {env} environment's torch {found['torch']} loads NCCL {found['nccl']}, "
                          f"gpu-lock.json pins {nccl}")


def check_parity(learner: dict, server: dict, server_where: str) -> None:
    """The learner's and a server's probed versions (`probe`) form one NCCL communicator."""
    if learner.get("nccl") != server.get("nccl") or not learner.get("nccl"):
        raise ParityError(
            f"NCCL mismatch: the learner's torch {learner.get('torch')} has NCCL {learner.get('nccl') or 'none'}, "
            f"the SGLang server's ({server_where}) torch {server.get('torch')} has NCCL "
            f"{server.get('nccl') or 'none'}: every weight update would fail; install both from gpu-lock.json "
            "(./run.sh setup, ./run.sh setup-sglang)")


def probe(python: str | None = None, timeout: float = 120.0) -> dict:
    """{torch, nccl} of `python` (None: this interpreter); ParityError naming it when it cannot tell."""
    if python is None:
        scope: dict = {}
        from contextlib import redirect_stdout
        from io import StringIO
        out = StringIO()
        with redirect_stdout(out):
            exec(PROBE, scope)
        return json.loads(out.getvalue())
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ParityError(f"{python}: cannot ask it for its torch and NCCL versions ({e})") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ParityError(f"{python}: cannot import torch to read its NCCL version: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    """`check-lock` | `check-env learner|sglang` (this interpreter against its pins) |
    `check-pair LEARNER_PY SERVER_PY` | `pin ENV NAME` (prints a pinned version, for run.sh)."""
    try:
        lock = load_lock()
        if argv[:1] == ["check-lock"]:
            lock_parity(lock)
        elif argv[:1] == ["check-env"] and len(argv) == 2 and argv[1] in lock["environments"]:
            check_installed(argv[1], probe(), lock)
        elif argv[:1] == ["check-pair"] and len(argv) == 3:
            check_parity(probe(argv[1]), probe(argv[2]), argv[2])
        elif argv[:1] == ["pin"] and len(argv) == 3:
            print(lock["environments"][argv[1]]["pins"][argv[2]])
        else:
            print(main.__doc__, file=sys.stderr)
            return 2
    except ParityError as e:
        print(f"[gpu_env] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
