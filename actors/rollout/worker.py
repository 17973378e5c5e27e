"""A workflow process: loads rollout.workflow once and runs many samples at a time on one event loop.

It reads jobs ``(jid, problem, base_url, api_key)`` from its pipe and answers each with ``(jid, kind, value)``:
kind "ok" (value: the reward or None), "timeout" or "error" (value: why, with the traceback). A workflow
that blocks the loop is the parent's to kill (actors.rollout.pool). Imports nothing heavy (no torch).
"""
from __future__ import annotations

import asyncio
import os
import traceback
from multiprocessing.connection import Connection

from actors.rollout.workflow import WorkflowError, check_reward, load_workflow
from policies.verify.worker_limits import limit_worker

READY, FATAL = "ready", "fatal"
TRACEBACK_CHARS = 4000


def worker_main(conn: Connection, spec: str, memory_limit_mb: int | None, timeout: float,
                environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the rollout worker's, as a workflow reading its settings from it expects
    limit_worker(memory_limit_mb)
    try:
        import openai  # noqa: F401  (imported once, before the first sample's deadline runs)
        fn = load_workflow(spec)
    except (WorkflowError, ImportError) as e:
        conn.send((FATAL, str(e)))
        return
    asyncio.run(_serve(conn, fn, timeout))


async def _serve(conn: Connection, fn, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    def readable() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                if msg is None:
                    raise EOFError
                task = loop.create_task(_one(conn, fn, timeout, *msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            done.set()

    loop.add_reader(conn.fileno(), readable)
    conn.send((READY, None))
    await done.wait()
    for t in list(tasks):
        t.cancel()


async def _one(conn: Connection, fn, timeout: float, jid: int, problem: dict, base_url: str, api_key: str) -> None:
    import openai
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout)
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            reply = (jid, "ok", check_reward(await fn(problem, client)))
    except TimeoutError:
        if deadline.expired():
            reply = (jid, "timeout", f"the workflow ran past rollout.workflow_timeout={timeout:g}s")
        else:
            reply = (jid, "error", traceback.format_exc()[-TRACEBACK_CHARS:])
    except asyncio.CancelledError:
        raise
    except BaseException:  # a user's bug, SystemExit included: this sample fails, the process serves on
        reply = (jid, "error", traceback.format_exc()[-TRACEBACK_CHARS:])
    finally:
        try:
            await client.close()
        except Exception:
            pass
    try:
        conn.send(reply)
    except (OSError, EOFError, ValueError):  # the parent is gone, or the reward does not pickle: nothing to do
        pass
