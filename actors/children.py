"""Child processes that die with their parent: the launcher's actors, a generator's SGLang server.

Both start children in sessions of their own (a Ctrl-C meant for the parent must not reach them first),
so nothing else would end them when the parent is SIGKILLed; left alone, an SGLang server would keep
its GPU and an actor its bus name.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int):
    """preexec_fn: SIGKILL the child when the thread that started it exits (SIGKILL of the parent included),
    and at once if the parent died between fork and now. Linux only; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(1)  # the parent died before the prctl took effect
    return preexec
