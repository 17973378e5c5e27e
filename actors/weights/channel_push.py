"""The tensor-channel way: weights offered over a channel chosen by locality, then an UPDATE_WEIGHTS
request to each generator, which reads them and loads them itself.

The torch and simulated generators take weights this way, and so do SGLang generators whose
servers load them from disk (actors.weights.sglang_disk, in the generator's process). One offer per
channel kind serves every generator that uses that kind: shared memory on the learner's host (a
copy made at send time), zmq across hosts, by reference in the learner's process. Zero-copy kinds
are sent a clone, as the learner trains on while the generators read.
"""
from __future__ import annotations

import asyncio
import logging

import torch

from actors import protocol as P
from bus.errors import BusError, MessageTooLarge, PeerGone, ProtocolError, RemoteError
from tensors.channels.shm import MAX_READERS as SHM_MAX_READERS

log = logging.getLogger("actors.weights.channel_push")
_POLL = 0.5  # seconds between looks at a transfer's progress
_ONE_REQUEST = 24 * 3600.0  # one copy's own limit: the progress watch in _until_loaded decides
_GONE_GRACE = 5.0  # a generator the broker does not know is waited for this long (registering again)


class ChannelPush:
    """Offers and pushes on behalf of ``actor`` (the broadcaster: its channels, its bus requests)."""

    def __init__(self, actor, *, update_timeout: float, attempt_timeout: float, idle_timeout: float = 30.0):
        self.actor = actor
        self.update_timeout = update_timeout  # how long an offer lives, and a push's deadline before its pull
        self.attempt_timeout = attempt_timeout  # an update not pulled this long is sent again
        self.idle_timeout = idle_timeout  # a pull whose bytes stop moving this long is given up

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
            reply = await self._until_loaded(gen, {"version": version, "weights_ref": desc}, desc, within)
            return int(reply["version"]) == version
        except Exception as exc:
            log.warning("weight update v%d to %s failed, dropping it from this update: %s", version, gen.name, exc)
            return False

    async def _until_loaded(self, gen, body: dict, desc: dict, within: float):
        """UPDATE_WEIGHTS to ``gen`` until it answers -> its reply.

        A bulk transfer is alive while its bytes move. Until ``gen`` starts pulling, the request is
        sent again every ``attempt_timeout`` (a broker restart may have lost it) and the wait is
        bounded by ``within``; once the bytes move (a zmq offer tells how many went out) it is not
        sent again while they move, and given up only after ``idle_timeout`` without one moving; with
        every byte out, the generator has ``within`` more to load them."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        moved, since, request, sent_at, gone_since = None, start, None, start, None
        try:
            while True:
                if request is None:
                    request = asyncio.ensure_future(self.actor.bus.request(gen.name, P.UPDATE_WEIGHTS, body,
                                                                           timeout=_ONE_REQUEST))
                    sent_at = loop.time()
                done, _ = await asyncio.wait({request}, timeout=_POLL)
                now = loop.time()
                if done:
                    try:
                        return request.result()
                    except (RemoteError, MessageTooLarge, ProtocolError):
                        raise
                    except BusError as exc:  # lost with a broker restart, or gen registering again
                        gone_since = (gone_since or now) if isinstance(exc, PeerGone) else None
                        if moved is None and now - start > within or gone_since and now - gone_since > _GONE_GRACE:
                            raise
                        log.info("UPDATE_WEIGHTS to %s not answered (%s); sending it again", gen.name, exc)
                        request = None
                        await asyncio.sleep(0.5)
                        continue
                m = self.actor.channels.moved(desc)
                if m is None:  # not pulled (yet), or a channel kind that cannot tell
                    if now - start > within:
                        raise TimeoutError(f"{gen.name} did not take the weights within {within:g}s")
                    if now - sent_at > self.attempt_timeout:  # lost? a generator ignores a second copy
                        request.cancel()
                        request = None
                    continue
                if m != moved:
                    moved, since = m, now
                elif m >= desc.get("nbytes", 0):  # all out: loading them
                    if now - since > within:
                        raise TimeoutError(f"{gen.name} did not load the weights within {within:g}s of receiving them")
                elif now - since > self.idle_timeout:
                    raise TimeoutError(f"no byte of the weights moved to {gen.name} for {self.idle_timeout:g}s "
                                       f"({moved} of {desc.get('nbytes')} bytes sent)")
        finally:
            if request is not None and not request.done():
                request.cancel()
