"""A test's child process: started by spawn, reached over a pipe, never left running."""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
from collections.abc import Iterator

SPAWNED: set[int] = set()  # pids of every child started here (a /dev/shm sweep counts their segments as ours)


@contextlib.contextmanager
def spawned(target, *args) -> Iterator[tuple[mp.Process, object]]:
    """Run `target(conn, *args)` in a spawned child; yields (process, our end of the pipe), killed at exit."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    SPAWNED.add(proc.pid)
    try:
        yield proc, parent
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


async def let_go(proc: mp.Process, parent, timeout: float = 30.0) -> int | None:
    """Tell the child "done" and wait for it to leave; its exit code."""
    parent.send("done")
    await asyncio.to_thread(proc.join, timeout)
    return proc.exitcode
