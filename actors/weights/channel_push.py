"""The tensor-channel way: weights offered over a channel chosen by locality, then an UPDATE_WEIGHTS
request to each generator, which reads them and loads them itself.

The torch and simulated generators take weights this way, and so do SGLang generators whose
servers load them from disk (actors.weights.sglang_disk, in the generator's process). One offer per
channel kind serves every generator that uses that kind: shared memory on the learner's host (a
copy made at send time), zmq across hosts, by reference in the learner's process. Zero-copy kinds
are sent a clone, as the learner trains on while the generators read.
"""
from __future__ import annotations

import logging

import torch

from actors import protocol as P
from tensors.channels.shm import MAX_READERS as SHM_MAX_READERS

log = logging.getLogger("actors.weights.channel_push")


class ChannelPush:
    """Offers and pushes on behalf of ``actor`` (the broadcaster: its channels, its bus requests)."""

    def __init__(self, actor, *, update_timeout: float, attempt_timeout: float):
        self.actor = actor
        self.update_timeout = update_timeout  # how long an offer lives, and a push's deadline
        self.attempt_timeout = attempt_timeout  # an update unanswered this long is sent again

    async def offer(self, gens: list, weights: dict[str, torch.Tensor], reads: int = 1) -> dict[str, dict]:
        """One send per channel kind, readable ``reads`` times by every generator that uses that kind
        -> each generator's descriptor."""
        channels = self.actor.channels
        by_kind: dict[str, list] = {}
        for g in gens:
            by_kind.setdefault(channels.kind_for([g]), []).append(g)
        descs = {}
        for kind, members in by_kind.items():
            payload = weights if kind == "shm" else {k: v.clone() for k, v in weights.items()}
            # a shm segment serves at most SHM_MAX_READERS reads: more generators on a host get more segments
            per = max(1, SHM_MAX_READERS // reads) if kind == "shm" else len(members)
            for i in range(0, len(members), per):
                chunk = members[i:i + per]
                desc = await channels.send(payload, chunk, timeout=self.update_timeout, reads=reads)
                descs.update({g.name: desc for g in chunk})
        return descs

    async def push(self, gen, desc: dict, version: int, within: float | None = None) -> bool:
        """Ask ``gen`` to load the offered weights as ``version``; whether it did (a failure is logged)."""
        within = self.update_timeout if within is None else within
        try:
            reply = await self.actor.request_until(gen.name, P.UPDATE_WEIGHTS, {"version": version, "weights_ref": desc},
                                                   within=within, attempt=min(self.attempt_timeout, within),
                                                   gone_grace=min(5.0, within))
            return int(reply["version"]) == version
        except Exception as exc:
            log.warning("weight update v%d to %s failed, dropping it from this update: %s", version, gen.name, exc)
            return False
