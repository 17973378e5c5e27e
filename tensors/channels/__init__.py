"""tensors/channels: where a payload's bytes travel, while the bus carries its small descriptor.

base.py (the Channel interface and descriptors), kinds.py (every kind by name, `open_channel`),
locality.py (`Channels`: which kind reaches a peer, decided in one place), local.py (same process, by
reference), shm.py (same host), outbox.py + zmq_channel.py (any host). Imports tensors' wire format and
errors, nothing above.

No GPU kinds: every payload here lives on the CPU (the packer builds batches there; the learner hands
its weights to the broadcaster in-process). GPU bytes move where a GPU group exists already: the packed
batch from learner rank 0 to the other ranks by a broadcast in their NCCL group
(actors.learner.rank_link), the weights to SGLang over the weight group or SGLang's own update path.
The CuPy NCCL channel was removed for that reason (a second communicator, its own unique id exchange,
its own NCCL build to keep level with torch's, for a transfer the rank group does), and the CUDA IPC
channel because a generator sharing the learner's GPU is an SGLang server, which takes weights through
SGLang's own mechanisms, never from our channels.
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
