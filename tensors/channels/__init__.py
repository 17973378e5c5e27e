"""Tensor channels, chosen by locality.  The GPU kinds import CuPy only when opened."""

from __future__ import annotations

from typing import Any

import torch

from tensors.channels.base import Channel, Descriptor, Payload
from tensors.channels.local import DEFAULT_HUB, LocalChannel, LocalHub
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


async def receive(descriptor: Descriptor, *, timeout: float, **opts: Any) -> Payload:
    """Receive a payload through a fresh channel of the descriptor's kind, closed afterwards.

    Convenient for a receiver that holds no channel.  The received tensors stay valid after the
    close.  NCCL needs the group's channel: call its `recv` instead.
    """
    kind = descriptor.get("kind") if isinstance(descriptor, dict) else None
    if kind == "nccl":
        raise ValueError("an nccl descriptor must be received with the group's NcclChannel.recv")
    channel = open_channel(kind, **opts) if kind in KINDS else None
    if channel is None:
        raise ValueError(f"descriptor has unknown channel kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        return await channel.recv(descriptor, timeout=timeout)
    finally:
        await channel.close()


def choose_kind(same_process: bool, same_host: bool, device: str | torch.device = "cpu") -> str:
    """The cheapest channel for a peer: by reference, shared memory / CUDA IPC, or zmq / NCCL."""
    on_gpu = torch.device(device).type == "cuda"
    if same_process:
        return "local"
    if same_host:
        return "cuda_ipc" if on_gpu else "shm"
    return "nccl" if on_gpu else "zmq"


__all__ = [
    "Channel", "Descriptor", "Payload", "KINDS", "open_channel", "choose_kind", "receive",
    "LocalChannel", "LocalHub", "DEFAULT_HUB", "ShmChannel", "sweep_orphans", "ZmqChannel",
]  # fmt: skip
