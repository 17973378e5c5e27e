"""Tensor channels, chosen by locality.  The GPU kinds import CuPy only when opened."""

from __future__ import annotations

from tensors.channels.base import Channel, Descriptor, Payload
from tensors.channels.kinds import KINDS, open_channel
from tensors.channels.local import DEFAULT_HUB, LocalChannel, LocalHub
from tensors.channels.locality import Channels, TensorOptions, choose_kind
from tensors.channels.outbox import Curve
from tensors.channels.shm import ShmChannel, sweep_orphans
from tensors.channels.zmq_channel import ZmqChannel

__all__ = [
    "Channel", "Descriptor", "Payload", "KINDS", "open_channel", "choose_kind",
    "Channels", "TensorOptions", "Curve",
    "LocalChannel", "LocalHub", "DEFAULT_HUB", "ShmChannel", "sweep_orphans", "ZmqChannel",
]  # fmt: skip
