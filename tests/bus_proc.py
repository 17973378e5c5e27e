"""Helpers for the bus tests: real child processes (a broker, an echo actor) with bounded waits.

Run as a script it is the echo actor: `python tests/bus_proc.py ADDRESS NAME HEARTBEAT [KEYDIR]`.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


async def spawn(*args: str, ready: str, timeout: float = 15.0) -> tuple[asyncio.subprocess.Process, str]:
    """Start `python args...` and wait for the stdout line beginning with `ready`; returns (proc, line)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, cwd=ROOT, env=ENV,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
            if not line:
                raise RuntimeError(f"{args} exited with {await proc.wait()} before printing {ready!r}")
            if line.startswith(ready):
                return proc, line.strip()
    except BaseException:
        await kill(proc)
        raise


async def spawn_broker(bind: str = "tcp://127.0.0.1:0", heartbeat: float = 0.1, *extra: str):
    proc, line = await spawn("-m", "bus.broker", "--bind", bind, "--heartbeat-interval", str(heartbeat),
                             "--log-level", "WARNING", *extra, ready="BROKER ")
    return proc, line.split()[1]


async def spawn_actor(address: str, name: str, heartbeat: float = 0.1, keydir: str = ""):
    proc, _ = await spawn(str(Path(__file__)), address, name, str(heartbeat), keydir, ready="READY")
    return proc


async def kill(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
    if proc.returncode is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    return await asyncio.wait_for(proc.wait(), timeout)


def _actor_main(address: str, name: str, heartbeat: str, keydir: str = "") -> None:
    import logging

    from actors.base import Actor, handler, run
    from bus.keys import client_kwargs

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    kw = client_kwargs(keydir, "tool")  # a keyed bus lets the launcher's key register a tool

    class Echo(Actor):
        @handler("echo")
        async def echo(self, body, src):
            return {"body": body, "src": src, "pid": os.getpid(),
                    "loop": type(asyncio.get_running_loop()).__module__}

        @handler("hang")
        async def hang(self, body, src):
            await asyncio.sleep(3600)

        @handler("stop")
        async def stop_me(self, body, src):
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.stop()))
            return "stopping"

        async def on_start(self):
            print("READY", os.getpid(), flush=True)

    run(Echo(name, "tool" if keydir else "echo", address, heartbeat_interval=float(heartbeat), **kw))


if __name__ == "__main__":
    _actor_main(*sys.argv[1:])
