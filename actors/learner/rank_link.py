"""Rank 0's commands and batches to the other learner ranks: only the job's own ranks can read or forge them.

The launcher hands every rank of one launch the same random secret (SECRET_ENV). From it each rank derives
two CurveZMQ key pairs, the link's server pair and the ranks' client pair: rank 0 serves its commands from
a tensors.channels outbox (the zmq channel's, CurveZMQ with ZAP letting in only the client key) bound to
its own address, and ranks > 0 pull them with the client pair, checking the server key. A process without
the secret can neither read a command nor pose as rank 0. The group's TCP store, which authenticates
nothing, carries only torch's own rendezvous; and a process that joined it without the secret is found by
`prove_secret` (an HMAC per rank, all-gathered) before any command is sent or obeyed.

The packed batch goes with its command: on CPU as the command's tensor frames (tensors.wire, never a
pickle), on GPU by a broadcast inside the NCCL rank group (`broadcast_batch`), which the group already
holds: a second communicator (CuPy's NCCL) would need its own unique id, its own NCCL build in step with
torch's, and its own abort path, for one transfer the group's own broadcast does.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq
import zmq.utils.z85

from tensors import wire
from tensors.channels.outbox import Curve, Outbox, Puller
from tensors.errors import TransferError

SECRET_ENV = "BOBA_LEARNER_SECRET"
POLL_S = 0.05  # how often a waiting rank asks for the next command
ENDPOINT_BYTES = 256


def key_pair(secret: bytes, who: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 CurveZMQ keys derived from the job's secret for `who` ("server" or "client")."""
    sk = zmq.utils.z85.encode(hashlib.sha256(b"boba learner ranks " + who.encode() + b"\0" + secret).digest())
    return zmq.curve_public(sk), sk


def secret_tag(secret: bytes, rank: int) -> bytes:
    return hmac.new(secret, f"learner rank {rank}".encode(), hashlib.sha256).digest()


def waited(work, timeout: float, what: str) -> None:
    """Wait for an async collective at most `timeout` s (the same call on gloo and nccl)."""
    if work.wait(timedelta(seconds=timeout)) is False:
        raise RuntimeError(f"{what}: not done within {timeout:g} s")


def prove_secret(rank: int, size: int, secret: bytes, device: torch.device, timeout: float) -> list[int]:
    """Every rank shows an HMAC of its rank under the job's secret -> the ranks whose tag is wrong."""
    mine = torch.tensor(list(secret_tag(secret, rank)), dtype=torch.uint8, device=device)
    tags = [torch.empty_like(mine) for _ in range(size)]
    waited(dist.all_gather(tags, mine, async_op=True), timeout, "showing the job's secret")
    return [r for r, t in enumerate(tags) if not hmac.compare_digest(bytes(t.cpu().tolist()), secret_tag(secret, r))]


def broadcast_bytes(data: bytes | None, device: torch.device, timeout: float) -> bytes:
    """Rank 0's `data` (at most ENDPOINT_BYTES) on every rank, over the (already proven) group."""
    buf = torch.zeros(ENDPOINT_BYTES + 1, dtype=torch.uint8)
    if data is not None:
        buf[0], buf[1:1 + len(data)] = len(data), torch.tensor(list(data), dtype=torch.uint8)
    buf = buf.to(device)
    waited(dist.broadcast(buf, src=0, async_op=True), timeout, "sharing the command link's address")
    raw = buf.cpu().tolist()
    return bytes(raw[1:1 + raw[0]])


def broadcast_batch(header: bytes, tensors: list[torch.Tensor] | None, device: torch.device, timeout: float):
    """The batch `header` describes, from rank 0's `tensors` to every rank, over the group (on `device`:
    NCCL moves GPU memory), each tensor under the deadline -> the batch on the CPU."""
    entries = wire.parse_header(header).entries
    moved = []
    for i, e in enumerate(entries):
        t = tensors[i].to(device) if tensors is not None else torch.empty(e.shape, dtype=e.dtype, device=device)
        if t.numel():
            waited(dist.broadcast(t, src=0, async_op=True), timeout, f"broadcasting the batch's {e.name}")
        moved.append(t.cpu())
    return wire.decode(header, moved)


class CommandOutbox:
    """Rank 0's side: each command (and its batch's frames) waits in the outbox until every rank pulled it."""

    def __init__(self, secret: bytes, bind: str, readers: int, ttl: float):
        public, sk = key_pair(secret, "server")
        self._outbox = Outbox(f"tcp://{f'[{bind}]' if ':' in bind else bind}:0",
                              curve=Curve(public, sk, frozenset({key_pair(secret, "client")[0]})))
        self.endpoint, self.readers, self.ttl = self._outbox.endpoint, readers, ttl
        self._seq = 0

    def put(self, command: dict, frames: list) -> None:
        self._outbox.put(f"cmd-{self._seq}", [json.dumps(command).encode(), *frames], ttl=self.ttl,
                         readers=self.readers)
        self._seq += 1

    def close(self, drain: float = 0.0) -> None:
        """Close once every rank pulled every command and the last reply left for the kernel, or after
        `drain` s: closing under a rank still polling for the last command (stop) fails that rank."""
        deadline = time.monotonic() + drain
        last = f"cmd-{self._seq - 1}"
        while time.monotonic() < deadline and (len(self._outbox) or not self._outbox.delivered(last)):
            time.sleep(0.01)
        self._outbox.close()


class CommandInbox:
    """A rank > 0's side: pulls command after command from rank 0's outbox with the job's client keys."""

    def __init__(self, secret: bytes, endpoint: str, timeout: float):
        public, sk = key_pair(secret, "client")
        self._server_key = key_pair(secret, "server")[0].decode()
        self._puller = Puller(curve=Curve(public, sk, frozenset()))
        self._loop = asyncio.new_event_loop()
        self.endpoint, self.timeout = endpoint, timeout
        self._seq = 0

    def next(self) -> tuple[dict, list]:
        """(command, its frames) once rank 0 posts it, however long that takes; TransferError once rank 0
        does not answer within the timeout (dead or frozen) or refuses our keys."""
        tid = f"cmd-{self._seq}"
        while True:
            try:
                frames = self._loop.run_until_complete(self._puller.request(
                    self.endpoint, b"GET", tid, peer="learner rank 0", timeout=self.timeout,
                    server_key=self._server_key))
                break
            except TransferError as exc:
                if exc.phase != "refused":  # refused: not posted yet
                    raise
            time.sleep(POLL_S)
        self._seq += 1
        return json.loads(frames[0].bytes), [f.buffer for f in frames[1:]]

    def close(self) -> None:
        self._puller.close()
        self._loop.close()
