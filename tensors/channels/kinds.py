"""Every channel kind by name, and the one function that opens one."""
from __future__ import annotations

from typing import Any

from tensors.channels.base import Channel
from tensors.channels.local import LocalChannel
from tensors.channels.shm import ShmChannel
from tensors.channels.zmq_channel import ZmqChannel

KINDS = ("local", "shm", "zmq")


def open_channel(kind: str, **opts: Any) -> Channel:
    """A channel of the given kind; `opts` go to its constructor (e.g. name=..., bind=...)."""
    if kind == "local":
        return LocalChannel(**opts)
    if kind == "shm":
        return ShmChannel(**opts)
    if kind == "zmq":
        return ZmqChannel(**opts)
    raise ValueError(f"unknown channel kind {kind!r}; known kinds: {', '.join(KINDS)}")
