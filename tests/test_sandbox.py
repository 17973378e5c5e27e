"""The Python tool's sandbox (actors.rollout.sandbox): hostile snippets are refused and the next run works.

The jail's namespaces and uid need root (CI runs as root); without it those tests skip and the fallback
test still runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from actors.rollout import sandbox
from actors.rollout.sandbox import UID_BASE, UID_SPAN, run_python

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the jail's uid and namespaces need root")


def sandbox_pids() -> list[int]:
    """Processes still running as one of the sandbox's uids."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                uid = int((d / "status").read_text().split("\nUid:")[1].split()[0])
            except (OSError, IndexError):
                continue
            if UID_BASE <= uid < UID_BASE + UID_SPAN:
                pids.append(int(d.name))
    return pids


async def assert_next_run_works() -> None:
    r = await run_python("print(6 * 7)")
    assert (r.stdout, r.exit, r.reason) == ("42\n", 0, "ok"), r


async def test_normal_code_returns_its_stdout(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    code = ("import os, sys\nprint(sum(range(10)))\nprint(sorted(os.environ))\nprint(os.getcwd())\n"
            "print('err', file=sys.stderr)\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    r = await run_python(code)
    assert r.reason == "ok" and r.exit == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "45" and lines[3] == "ok" and r.stderr == "err\n"
    assert "SECRET_TOKEN" not in lines[1]
    assert not Path(lines[2]).exists(), "the scratch directory is removed after the run"
    r = await run_python("import sys; sys.exit(3)")
    assert (r.exit, r.reason) == (3, "error")
    with pytest.raises(ValueError, match="memory_mb"):
        await run_python("print(1)", memory_mb=0)
    with pytest.raises(ValueError, match="timeout_s"):
        await run_python("print(1)", timeout_s="soon")


@root_only
async def test_hostile_snippets_are_refused_and_the_next_run_works():
    # its own uid, no groups, and not root
    r = await run_python("import os; print(os.getuid(), os.getgid(), os.getgroups())")
    uid, gid, groups = r.stdout.split(maxsplit=2)
    assert UID_BASE <= int(uid) < UID_BASE + UID_SPAN and gid == uid and groups.strip() == "[]", r

    # network: a port open on the host's loopback is unreachable from the sandbox's own network namespace
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.setblocking(False)
        port = srv.getsockname()[1]
        r = await run_python(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                             "print('connected')")
        assert r.reason == "error" and "connected" not in r.stdout and "unreachable" in r.stderr, r
        with pytest.raises(BlockingIOError):
            srv.accept()
    await assert_next_run_works()

    # writes outside the scratch directory: a world-writable directory of the test's, /tmp, /dev/shm (hidden
    # under empty tmpfs), /run/lock (read-only like every other mount)
    outside = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir="/tmp"))
    try:
        outside.chmod(0o777)
        name = f"sandbox-{uuid.uuid4().hex}"
        targets = [outside / name, Path("/tmp") / name, Path("/dev/shm") / name]
        if Path("/run/lock").is_dir() and Path("/run/lock").stat().st_mode & 0o002:   # world-writable, not hidden
            targets.append(Path("/run/lock") / name)
        code = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('x')\n    print('wrote', {str(t)!r})\n"
                         f"except OSError as e:\n    print('refused')" for t in targets)
        code += ("\nimport os\nprint(sorted(set(os.listdir('/tmp')) - {os.path.basename(os.getcwd())}), "
                 "os.listdir('/dev/shm'))")
        r = await run_python(code)   # ... and the host's files there are out of sight: only the scratch
        # directory, and the interpreter's own directory where it lives under /tmp (a fresh clone's venv)
        shown = sorted({Path(p).parts[2] for p in sandbox.interpreter_prefixes() if p.startswith("/tmp/")})
        assert r.stdout.splitlines() == ["refused"] * len(targets) + [f"{shown} []"], r
        assert not any(t.exists() for t in targets)
    finally:
        for t in outside.iterdir():
            t.unlink()
        outside.rmdir()
    await assert_next_run_works()

    # process limit: forks are refused past max_procs, and children left behind die with the snippet
    r = await run_python("import os, time\nn = 0\ntry:\n    while n < 100:\n        if os.fork() == 0:\n"
                         "            time.sleep(60)\n            os._exit(0)\n        n += 1\n"
                         "except OSError:\n    print('refused after', n)", max_procs=8)
    assert r.stdout.startswith("refused after") and int(r.stdout.split()[-1]) < 8, r
    assert sandbox_pids() == []
    # a fork bomb that swallows the refusal (and leaves the process group) ends at the timeout
    r = await run_python("import os\nwhile True:\n    try:\n        os.fork() or os.setsid()\n"
                         "    except OSError:\n        pass", timeout_s=1.5, cpu_s=60)
    assert r.reason == "timeout", r
    assert sandbox_pids() == []
    await assert_next_run_works()

    # memory: an allocation past memory_mb fails (without the limit it would not)
    r = await run_python("x = bytearray(512 << 20)\nprint(len(x))", memory_mb=128)
    assert r.reason == "error" and "MemoryError" in r.stderr, r
    await assert_next_run_works()


async def test_infinite_loop_and_huge_output_end_early():
    r = await run_python("while True:\n    pass", timeout_s=1.0, cpu_s=60)  # the CPU limit far: no race
    assert (r.reason, r.exit) == ("timeout", -9), r
    await assert_next_run_works()
    r = await run_python("while True:\n    print('y' * 1000)", output_limit=5000, timeout_s=60)
    assert r.reason == "output_limit" and r.stdout.startswith("y" * 1000), r
    assert len(r.stdout) <= 5000 + len("\n[output truncated]") and r.stdout.endswith("[output truncated]")
    await assert_next_run_works()


async def test_runs_do_not_block_the_event_loop():
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1
    ticker = asyncio.create_task(tick())
    results = await asyncio.gather(*(run_python(f"import time; time.sleep(0.5); print({i})") for i in range(3)))
    ticker.cancel()
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"]
    assert ticks >= 5


async def test_without_root_it_runs_with_limits_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_said", set())
    with caplog.at_level(logging.WARNING, logger="actors.rollout.sandbox"):
        r1 = await run_python("print('hi')")
        # each limit far from the other, so that which one ends the loop is not a race
        r2 = await run_python("while True:\n    pass", timeout_s=1.0, cpu_s=60)
        r3 = await run_python("while True:\n    pass", timeout_s=60.0, cpu_s=1)
    assert (r1.stdout, r1.reason, r2.reason, r3.reason) == ("hi\n", "ok", "timeout", "cpu")
    said = [m for m in caplog.messages if "not root" in m]
    assert len(said) == 1 and "namespaces" in said[0]


@root_only
async def test_a_cancelled_run_leaves_no_process():
    task = asyncio.create_task(run_python("import os, time\nos.fork()\ntime.sleep(100)", timeout_s=60))
    for _ in range(100):                      # until both processes run (at most 10 s)
        await asyncio.sleep(0.1)
        if len(sandbox_pids()) == 2:
            break
    assert len(sandbox_pids()) == 2
    task.cancel()                             # a workflow's sample deadline, say
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):                       # SIGTERM now, SIGKILL after a second's grace: at most 5 s
        if not sandbox_pids():
            break
        await asyncio.sleep(0.1)
    assert sandbox_pids() == []
    await assert_next_run_works()


@root_only
def test_an_interpreter_in_a_hidden_directory_stays_reachable(tmp_path):
    # a venv under /tmp (as a fresh clone there has) behind a 0700 parent: /tmp is covered in the jail
    home = tmp_path / "private"
    home.mkdir(mode=0o700)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home / "venv")], check=True, timeout=60)
    script = ("import asyncio, sys; sys.path.insert(0, sys.argv[1]); from actors.rollout.sandbox import run_python; "
              "r = asyncio.run(run_python('import sys; print(sys.prefix)')); print(r.reason, r.stdout.strip())")
    out = subprocess.run([str(home / "venv/bin/python"), "-c", script, str(Path(sandbox.__file__).parents[2])],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["ok", str(home / "venv")], out.stdout + out.stderr
