"""The limits of a process that runs users' code (reward functions here, workflows in actors.rollout): how
it is started and what it may take. Its parent enforces the deadline (it kills the process)."""
from __future__ import annotations

import multiprocessing as mp
import signal


def limit_worker(memory_limit_mb: int | None) -> None:
    """In a worker process that runs users' code: Ctrl-C is the parent's to handle, and the address space
    is capped (a runaway allocation fails in the worker, not on the machine). Rollout workers use it too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit_mb:
        try:
            import resource

            limit = memory_limit_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass


def pick_start_method(method: str | None = None) -> str:
    """The start method of users' worker processes: forkserver where there is one (a fork from a threaded
    parent is unsafe), else spawn."""
    method = method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if method == "fork":
        raise ValueError("start_method 'fork' is unsafe in a threaded parent; use forkserver or spawn")
    return method
