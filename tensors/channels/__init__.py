"""Tensor channels, chosen by locality.  The GPU kinds import CuPy only when opened."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from tensors.channels.base import Channel, Descriptor, Payload
from tensors.channels.local import DEFAULT_HUB, LocalChannel, LocalHub
from tensors.channels.locality import Channels, TensorOptions, choose_kind
from tensors.channels.outbox import Curve
from tensors.channels.shm import ShmChannel, sweep_orphans
from tensors.channels.zmq_channel import ZmqChannel

KINDS = ("local", "shm", "zmq", "cuda_ipc", "nccl")


def open_channel(kind: str, **opts: Any) -> Channel:
    """A channel of the given kind; `opts` go to its constructor (e.g. name=..., bind=...)."""
    if kind == "local":
        return LocalChannel(**opts)
    if kind == "shm":
        return ShmChannel(**opts)
    if kind == "zmq":
        return ZmqChannel(**opts)
    if kind == "cuda_ipc":
        from tensors.channels.cuda_ipc import CudaIpcChannel

        return CudaIpcChannel(**opts)
    if kind == "nccl":
        from tensors.channels.nccl import NcclChannel

        return NcclChannel(**opts)
    raise ValueError(f"unknown channel kind {kind!r}; known kinds: {', '.join(KINDS)}")


class Receivers:
    """Receiving channels kept per event loop, so that zmq connections and shm mappings are reused
    across receives; they are closed when their loop is garbage collected (or by `close()`)."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict] = weakref.WeakKeyDictionary()

    def get(self, kind: str, **opts: Any) -> Channel:
        loop = asyncio.get_running_loop()
        channels = self._by_loop.get(loop)
        if channels is None:
            channels = self._by_loop[loop] = {}
            weakref.finalize(loop, _close_all, channels)
        key = (kind, tuple(sorted(opts.items())))
        if key not in channels:
            channels[key] = open_channel(kind, **opts)
        return channels[key]

    def close(self) -> None:
        for channels in list(self._by_loop.values()):
            _close_all(channels)


def _close_all(channels: dict) -> None:
    for channel in channels.values():
        channel.close_now()
    channels.clear()


RECEIVERS = Receivers()


async def receive(
    descriptor: Descriptor, *, timeout: float, receivers: Receivers = RECEIVERS, **opts: Any
) -> Payload:
    """Receive a payload through a channel of the descriptor's kind, for receivers that hold none.

    NCCL needs the group's channel: call its `recv` instead.
    """
    kind = descriptor.get("kind") if isinstance(descriptor, dict) else None
    if kind == "nccl":
        raise ValueError("an nccl descriptor must be received with the group's NcclChannel.recv")
    if kind not in KINDS:
        raise ValueError(f"descriptor has unknown channel kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return await receivers.get(kind, **opts).recv(descriptor, timeout=timeout)


__all__ = [
    "Channel", "Descriptor", "Payload", "KINDS", "open_channel", "choose_kind", "receive", "Receivers",
    "Channels", "TensorOptions", "Curve",
    "LocalChannel", "LocalHub", "DEFAULT_HUB", "ShmChannel", "sweep_orphans", "ZmqChannel",
]  # fmt: skip
