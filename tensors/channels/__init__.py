"""tensors/channels: where a payload's bytes travel, while the bus carries its small descriptor.

base.py (the Channel interface and descriptors), kinds.py (every kind by name, `open_channel`),
locality.py (`Channels`: which kind reaches a peer, decided in one place), local.py (same process, by
reference), shm.py (same host), outbox.py + zmq_channel.py (any host), cuda_ipc.py and nccl.py (GPUs,
through CuPy, imported only when opened). Imports tensors' wire format and errors, nothing above.
"""

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
