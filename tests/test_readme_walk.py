"""The README walked as a newcomer would: every command of its ```bash blocks, in order, on a copy of the
repository as a fresh clone has it (tracked files only, no data/, no runs/).

The quick commands run and their promised output is checked; the long or GPU ones at least parse
(`--help`, or `--dry-run`, which validates the config, the data and the placement; the files a long one
would leave are copied in from the first run, so that the commands after it find them). A command the walk
does not know fails the test: a README line nobody ran is how the newcomer's first hour broke. At the
end `git status` is clean: everything the commands wrote is git-ignored.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shlex
import shutil
import time
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch_util import ROOT

README = ROOT / "README.md"
LAUNCH = ("python", "-m", "launcher")


def readme_commands(text: str) -> list[list[str]]:
    """Each command line of the ```bash blocks (continuations joined, comments dropped) as argv."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def fresh_clone(dest: Path) -> Path:
    """The tracked and not-ignored files of this tree, committed in a repository of their own."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
            (dest / name).chmod(src.stat().st_mode)
    git = ["git", "-c", "user.name=walk", "-c", "user.email=walk@example.invalid"]
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh clone"]):
        subprocess.run(git + argv, cwd=dest, check=True)
    return dest


def run_sh_ready(clone: Path) -> bool:
    """Whether ./run.sh would find its environment set up (the stamp of what run.sh's setup() hashes, in
    the venv running us): then the walk runs ./run.sh itself, else `python -m launcher`, what it execs."""
    digest = hashlib.sha256(b"".join((clone / f).read_bytes()
                                     for f in ("pyproject.toml", "run.sh", "gpu-lock.json"))).hexdigest()
    return (Path(sys.prefix) / f".setup-{digest[:16]}").exists()


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (the walk's cost, apart from a busy machine)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


class Walk:
    def __init__(self, clone: Path):
        self.clone, self.transcript = clone, []
        self.env = {**os.environ, "PYTHONPATH": str(clone), "PYTHONUNBUFFERED": "1", "BOBA_TORCH_THREADS": "1",
                    "VENV": sys.prefix}

    def sub(self, argv: list[str], timeout: float = 240) -> str:
        """A process, as the user types it (`python` is this venv's); its output, after checking rc 0."""
        if argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        t0, cpu0 = time.monotonic(), cpu_seconds()
        p = subprocess.run(argv, cwd=self.clone, env=self.env, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
        self.transcript.append(f"$ {shlex.join(argv)}   [{time.monotonic() - t0:.1f} s, "
                               f"{cpu_seconds() - cpu0:.1f} s CPU]\n{out[-3000:]}")
        assert p.returncode == 0, f"{shlex.join(argv)} exited {p.returncode}:\n{out[-3000:]}"
        return out

    def launcher(self, args: list[str]) -> str:
        """`python -m launcher ARGS` in this process (quick: torch is imported once), from the clone."""
        from launcher.__main__ import main
        out = io.StringIO()
        t0, cpu0 = time.monotonic(), cpu_seconds()
        cwd = os.getcwd()
        os.chdir(self.clone)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    rc = main(list(args))
                except SystemExit as exc:  # argparse's --help
                    rc = exc.code or 0
        finally:
            os.chdir(cwd)
        self.transcript.append(f"$ python -m launcher {shlex.join(args)}   [{time.monotonic() - t0:.1f} s, "
                               f"{cpu_seconds() - cpu0:.1f} s CPU]\n{out.getvalue()[-3000:]}")
        assert rc == 0, f"python -m launcher {shlex.join(args)} -> {rc}:\n{out.getvalue()[-3000:]}"
        return out.getvalue()


@pytest.mark.timeout(900)  # a tiny job and a dozen commands: 100 s of CPU; far longer on a busy machine
def test_every_readme_command_works_in_order_on_a_fresh_clone(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    walk = Walk(clone)
    use_run_sh = run_sh_ready(clone)
    commands = readme_commands(README.read_text())
    done = []
    try:
        for argv in commands:
            line = shlex.join(argv)
            if argv[:2] == ["git", "clone"] or argv[:1] == ["source"] or argv[:1] == ["curl"]:
                continue  # the copy is the clone; `python` is the venv's; no job serves /health here
            if argv[0] == "./run.sh":
                rest = argv[1:]
                if rest in ([], ["test"], ["setup-sglang"]):
                    if not rest:
                        walk.launcher(["main", "--help"])  # the 25-minute main job: its flags parse
                    continue  # the suite itself; SGLang's GPU environment
                out = walk.sub(argv if use_run_sh else [*LAUNCH, *rest], timeout=300)
                check_promise(clone, rest, out)
            elif argv[:3] == list(LAUNCH):
                args = [a for a in argv[3:] if a != "&"]
                if args == ["--help"]:
                    assert "sft" in walk.sub(argv), line  # outside the launcher's process: its entry point
                elif args[:1] in (["config"], ["eval"], ["filter"], ["keys"], ["data"]):
                    check_promise(clone, args, walk.launcher(args))
                elif args[:1] == ["sft"]:  # 25 optimiser steps: parsed here; --model tiny: test_first_hour.py
                    assert "tiny" in walk.launcher(["sft", "--help"])
                    fake_checkpoint(clone, args[args.index("--out") + 1])  # as the README goes on
                elif args[:1] not in (["attach"], ["status"], ["main"], ["plot"], ["actor"]):
                    out = walk.launcher(args if "--dry-run" in args else [*args, "--dry-run"])  # a long run
                    assert "# mode:" in out and "launcher actor learner" in out, out[-2000:]
                    if "--resume" in args:  # a second job: what it would leave, for the commands after it
                        steps = int(next(a for a in args if a.startswith("train.steps=")).split("=")[1])
                        last = clone / "runs/tiny/checkpoints/step-000003"
                        shutil.copytree(last, last.with_name(f"step-{steps:06d}"))
                else:
                    pytest.fail(f"README command the walk does not know: {line}")
            elif argv[:2] == ["python", "examples/make_gsm8k_parquet.py"]:
                walk.sub(argv)
                assert (clone / argv[2]).is_file()
            elif argv[:2] == ["python", "examples/embed_generator.py"]:
                assert "--job-gone-after" in walk.sub(["python", argv[1], "--help"])  # needs a live job
            elif argv[:1] == ["echo"] and argv[-2:] == [">", "hosts.txt"]:
                (clone / "hosts.txt").write_text(argv[1] + "\n")
            else:
                pytest.fail(f"README command the walk does not know: {line}")
            done.append(line)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                                capture_output=True, text=True, check=True).stdout
        assert status == "", f"the README's commands left files git would add:\n{status}"
        assert (clone / "runs/tiny").is_dir() and (clone / "keys").is_dir() and (clone / "hosts.txt").is_file()
    except BaseException:
        print("\n\n".join(walk.transcript))
        raise
    assert len(done) >= 20, done
    print("\n".join(line.splitlines()[0] for line in walk.transcript))  # each command with its time


def fake_checkpoint(clone: Path, out: str) -> None:
    """What `sft --out DIR` leaves (a model directory), for the commands after it."""
    shutil.copytree(clone / "runs/tiny/checkpoints/step-000003/model", clone / out)


def check_promise(clone: Path, args: list[str], out: str) -> None:
    """What the README says each quick command gives."""
    if args[:2] == ["--config", "configs/tiny.yaml"] and len(args) == 2:  # the first run
        assert "training finished at step 3" in out, out[-2000:]
        assert "wrote the arithmetic problems" in out and (clone / "data/arith/sft.jsonl").is_file()
        assert (clone / "runs/tiny/checkpoints/step-000003/model/config.json").is_file()
        assert len((clone / "runs/tiny/metrics.jsonl").read_text().splitlines()) == 3
    elif args[:1] == ["plot"]:
        assert out.strip().splitlines()[-1] == "runs/tiny/metrics.png" and (clone / "runs/tiny/metrics.png").is_file()
    elif args[:1] == ["config"]:
        assert re.search(r"^\s*group_size: 4\b", out, flags=re.M), out
    elif args[:1] == ["eval"]:
        assert re.search(r"pass@1", out) and "step-000005/model" in out, out
    elif args[:1] == ["filter"]:
        rows = [json.loads(line) for line in (clone / "runs/hard.jsonl").read_text().splitlines()]
        assert all({"prompt", "answer"} <= set(r) for r in rows), rows[:2]
    elif args[:1] == ["keys"]:
        assert any((clone / "keys").iterdir()), out
    elif args[:1] == ["data"]:  # python -m launcher data DIR: reasoning-gym's problems in four splits
        assert all((clone / args[1] / f"{s}.jsonl").is_file() for s in ("train", "test", "sft", "heldout")), out
