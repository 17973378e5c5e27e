"""A live subprocess whose output a test can wait on line by line (a job, an attached actor, a service)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.launch_util import ROOT

BUS_LINE = r"\[launcher\] mode: .*; bus (tcp://127\.0\.0\.1:\d+);"
JOB_ACTORS = ("sampler", "packer", "learner", "broadcaster", "verifier-0", "generator-0")  # a one-host tiny job


class Timeline:
    """Phase times since the test began, printed (so shown with a failed test's output)."""

    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self, phase: str) -> None:
        print(f"[test] {time.monotonic() - self.t0:5.1f} s: {phase}", flush=True)


class LiveProcess:
    def __init__(self, argv: list[str], *, cwd: Path = ROOT, name: str = ""):
        self.name = name or " ".join(argv[1:4])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BOBA_TORCH_THREADS": "1"}
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def launcher(cls, *args: str, cwd: Path = ROOT, name: str = "") -> "LiveProcess":
        return cls([sys.executable, "-m", "launcher", *args], cwd=cwd, name=name)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def output(self, last: int | None = None) -> str:
        with self._cond:
            return "\n".join(self.lines[-last:] if last else self.lines)

    def wait_for(self, pattern: str, timeout: float, *, after: int = 0) -> re.Match:
        """The first output line (from line `after` on) matching `pattern`; fails naming the process and
        the pattern."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = after
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "exited" if self._closed else f"gave none within {timeout:.0f} s"
                    raise AssertionError(f"{self.name}: {why} without a line matching {pattern!r}; "
                                         f"last lines:\n{self.output(40)}")
                self._cond.wait(min(left, 1.0))

    def wait_for_actors(self, names=JOB_ACTORS, timeout: float = 150) -> None:
        """Until the broker (echoed by the launcher) has said each of `names` joined."""
        deadline = time.monotonic() + timeout
        for name in names:
            self.wait_for(rf"joined: {re.escape(name)} ", max(1.0, deadline - time.monotonic()))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name}: still running after {timeout:.0f} s; last lines:\n"
                                 f"{self.output(40)}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the process (only it: it stops its own children) and reap it; SIGKILL past `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def job_and_attached(job: "LiveProcess"):
    """A test's body over `job` and the processes it attaches: yields `keep`, which registers an attached
    process (and returns it). On a failure every output is printed; at the end the attached processes stop
    (10 s each), then the job."""
    attached: list[LiveProcess] = []

    def keep(proc: LiveProcess) -> LiveProcess:
        attached.append(proc)
        return proc

    try:
        yield keep
    except BaseException:
        print(f"--- job ---\n{job.output()}\n--- attach ---\n" + "\n".join(p.output() for p in attached))
        raise
    finally:
        for proc in attached:
            proc.stop(timeout=10)
        job.stop()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (by the parent pids in /proc), parents before their children."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def status_table(address: str) -> dict[str, str]:
    """`python -m launcher status --bus ADDRESS` (run in this process) as name -> role."""
    import contextlib
    import io
    from launcher.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["status", "--bus", address])
    assert rc == 0, err.getvalue()
    header, *rows = out.getvalue().splitlines()
    assert header.split()[:2] == ["name", "role"]
    return {r.split()[0]: r.split()[1] for r in rows}
