"""A Python tool for agents: run a model-written snippet so that a hostile one cannot hurt the job.

`run_python(code, ...)` runs the snippet in its own process (asyncio subprocess: the event loop never
waits on it) and returns a `ToolResult`. The child side (actors.rollout.sandbox_jail) sets up the jail:

- as root (CI, a training host): an uid/gid of its own for each run (process limits do not bind root, and an
  uid per run keeps one snippet's fork bomb from using up the next one's process budget), no supplementary
  groups, no_new_privs; its own network namespace (a loopback that is down: no network at all), PID
  namespace (the snippet is PID 1: when it ends or is killed, all it started dies too) and mount namespace
  in which the scratch directory is a size-capped tmpfs and every other mount is read-only (so /tmp,
  /dev/shm and any other world-writable directory are closed too), /proc its own;
- always: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps, a
  wall-clock timeout that kills the whole process group, stdin closed, a scrubbed environment, the
  interpreter started isolated (`-I`: no PYTHON* variables, no user site, no script directory on sys.path;
  the venv's site-packages stay importable and are not writable by the sandbox's uid), stdout and stderr cut
  at `output_limit` bytes (more ends the run: an endless print loop costs no more than the limit);
- not root (a developer's laptop): rlimits, timeout and no_new_privs only, said once in the log (and
  RLIMIT_NPROC then counts all of the user's processes, so a snippet cannot start more).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

log = logging.getLogger(__name__)

JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_jail.py")
UID_BASE, UID_SPAN = 1_900_000_000, 1_000_000   # the sandbox's uids: nobody on the host owns them
REASONS = ("ok", "error", "timeout", "cpu", "output_limit", "killed")
_GRACE_S = 1.0
_said: set[str] = set()
_uids_in_use: set[int] = set()


@dataclass(frozen=True)
class ToolResult:
    """`exit`: the snippet's exit status (negative: the signal that ended it). `reason`: ok (exit 0),
    error (non-zero exit), timeout (wall clock), cpu (CPU-time limit), output_limit (stdout or stderr went
    past the limit: cut there and the run ended), killed (another signal)."""
    stdout: str
    stderr: str
    exit: int
    reason: str


def _env(scratch: str) -> dict[str, str]:
    """All the snippet's environment: nothing of the job's (no tokens, no keys, no paths)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": scratch, "TMPDIR": scratch, "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _claim_uid() -> int:
    while True:
        uid = UID_BASE + random.randrange(UID_SPAN)
        if uid not in _uids_in_use:
            _uids_in_use.add(uid)
            return uid


def _scratch_base(root: bool) -> str:
    """The temp directory, unless the sandbox's uid could not reach into it (a parent that is not o+x)."""
    base = tempfile.gettempdir()
    path = os.path.realpath(base)
    while root and path != "/":
        if not os.stat(path).st_mode & 0o001:
            return "/tmp"
        path = os.path.dirname(path)
    return base


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.warning("python sandbox: %s", msg)


def _check(name: str, value, lo: float, integer: bool = True) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value < lo:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"run_python {name}: expected {kind} >= {lo}, got {value!r}")


class _Sink:
    """One output stream, kept up to `limit` bytes; past it, `over` is called once and the rest dropped."""

    def __init__(self, limit: int, over):
        self.buf, self.limit, self.over, self.cut = bytearray(), limit, over, False

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(1 << 16):
            room = self.limit - len(self.buf)
            self.buf += chunk[:room]
            if len(chunk) > room and not self.cut:
                self.cut = True
                self.over()

    def text(self) -> str:
        s = self.buf.decode("utf-8", errors="replace")
        return s + "\n[output truncated]" if self.cut else s


def _read_notes(fd: int) -> list[dict]:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    notes = []
    for line in data.decode(errors="replace").splitlines():
        try:
            notes.append(json.loads(line))
        except ValueError:
            pass
    return notes


def _kill(proc: asyncio.subprocess.Process, sig: int) -> None:
    """SIGTERM: the jail kills the snippet's PID namespace; SIGKILL: the whole process group."""
    try:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def interpreter_prefixes() -> list[str]:
    """The directories the jail must expose for this interpreter to run (none inside another)."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix,
                                           os.path.dirname(os.path.realpath(sys.executable)))}
    return sorted(p for p in paths if not any(p.startswith(q + os.sep) for q in paths))


async def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, max_procs: int = 16,
                     cpu_s: int | None = None, output_limit: int = 8192, disk_mb: int = 32) -> ToolResult:
    """Run `code` with `python -I` in the sandbox (see the module docstring); `cpu_s` defaults to the
    timeout rounded up, `disk_mb` caps the scratch directory (as root) and every file written (always)."""
    if not isinstance(code, str):
        raise ValueError(f"run_python code: expected a str, got {type(code).__name__}")
    _check("timeout_s", timeout_s, 0.1, integer=False)
    cpu_s = int(-(-timeout_s // 1)) if cpu_s is None else cpu_s
    for name, value, lo in (("memory_mb", memory_mb, 16), ("max_procs", max_procs, 1), ("cpu_s", cpu_s, 1),
                            ("output_limit", output_limit, 1), ("disk_mb", disk_mb, 1)):
        _check(name, value, lo)
    root = os.geteuid() == 0
    if not root:
        _say_once("not root: no separate uid, no network/mount/PID namespaces, no read-only file system; "
                  "rlimits, timeout and no_new_privs only")
    uid = _claim_uid() if root else None
    scratch = tempfile.mkdtemp(prefix="sandbox-", dir=_scratch_base(root))
    prefixes = interpreter_prefixes()
    notes_r, notes_w = os.pipe()
    cfg = {"uid": uid, "scratch": scratch, "python": sys.executable, "expose": prefixes, "disk_mb": disk_mb,
           "notes_fd": notes_w, "env": _env(scratch), "deadline_s": int(timeout_s + 2 * _GRACE_S) + 1,
           "limits": {"as": memory_mb << 20, "cpu": cpu_s, "nproc": max_procs, "fsize": disk_mb << 20,
                      "nofile": 64}}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-B", JAIL, json.dumps(cfg), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, pass_fds=(notes_w,),
            start_new_session=True, env=_env(scratch))
        os.close(notes_w)
        notes_w = -1
        return await _supervise(proc, code.encode(), timeout_s, cpu_s, output_limit, notes_r)
    finally:
        for fd in (notes_r, notes_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
        _uids_in_use.discard(uid)


async def _supervise(proc, code: bytes, timeout_s: float, cpu_s: int, output_limit: int,
                     notes_fd: int) -> ToolResult:
    over = []

    def on_over():
        over.append(True)
        _kill(proc, signal.SIGTERM)
    out, err = _Sink(output_limit, on_over), _Sink(output_limit, on_over)
    try:
        proc.stdin.write(code)
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass
    tasks = [asyncio.ensure_future(out.drain(proc.stdout)), asyncio.ensure_future(err.drain(proc.stderr)),
             asyncio.ensure_future(proc.wait())]
    timed_out = False
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        if pending:
            timed_out = not over
            for sig in (signal.SIGTERM, signal.SIGKILL):
                _kill(proc, sig)
                _, pending = await asyncio.wait(pending, timeout=_GRACE_S)
                if not pending:
                    break
            if pending:
                log.error("python sandbox: process %d did not end %.0f s after SIGKILL", proc.pid, _GRACE_S)
    finally:
        for t in tasks:
            t.cancel()
        if proc.returncode is None:   # cancelled (the sample's deadline) or not ended by SIGKILL: no orphans
            _kill(proc, signal.SIGTERM)
            asyncio.get_running_loop().call_later(_GRACE_S, _kill, proc, signal.SIGKILL)
    cpu_used, errors = 0.0, []
    for n in _read_notes(notes_fd):
        if "missing" in n:
            _say_once(f"could not apply: {n['missing']}")
        cpu_used = max(cpu_used, n.get("cpu_s", 0.0))
        if "error" in n:
            errors.append(n["error"])
    for e in errors:
        log.error("python sandbox: %s", e)
    rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    stderr = "\n".join([err.text(), *errors]) if errors else err.text()
    if over:
        reason = "output_limit"
    elif timed_out:
        reason = "timeout"
    elif rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and cpu_used >= cpu_s):
        reason = "cpu"
    elif rc < 0:
        reason = "killed"
    else:
        reason = "ok" if rc == 0 else "error"
    return ToolResult(out.text(), stderr, rc, reason)
