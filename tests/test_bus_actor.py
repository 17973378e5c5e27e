"""The Actor base: declared handlers, errors as RemoteError, graceful stop, uvloop runner."""
import asyncio
import signal

import pytest

from actors.base import Actor, declared_handlers, handler
from bus.client import BusClient
from bus.errors import PeerGone, RemoteError
from bus_proc import kill, spawn_actor

HB = 0.1
pytestmark = pytest.mark.timeout(30)


class Scorer(Actor):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.finished = []

    @handler("score")
    async def score(self, body, src):
        if body < 0:
            raise ValueError(f"negative score {body}")
        return body * 2

    @handler("slow")
    async def slow(self, body, src):
        await asyncio.sleep(body)
        self.finished.append(body)
        return "done"


class LoudScorer(Scorer):
    @handler("score")  # overrides the base handler
    async def loud(self, body, src):
        return f"{body}!"


def test_declared_handlers_follow_the_mro():
    assert declared_handlers(Scorer) == {"score": "score", "slow": "slow"}
    assert declared_handlers(LoudScorer) == {"score": "loud", "slow": "slow"}
    with pytest.raises(TypeError, match="two handlers for 'x'"):
        declared_handlers(type("Bad", (Actor,), {"f": handler("x")(lambda s, b, r: 0),
                                                 "g": handler("x")(lambda s, b, r: 0)}))
    with pytest.raises(ValueError, match="not starting with '_'"):
        handler("_reply")


async def test_actor_embedded_in_a_loop_errors_and_graceful_stop(broker):
    actor = Scorer("scorer-0", "verifier", broker.address, heartbeat_interval=HB)
    runner = asyncio.ensure_future(actor.run_forever())
    me = BusClient(broker.address, "me", "generator", heartbeat_interval=HB)  # the broker routes 'score' from it
    await me.connect(timeout=5)
    try:
        for _ in range(200):
            if "scorer-0" in broker.registry:
                break
            await asyncio.sleep(0.01)
        assert await me.request("scorer-0", "score", 21, timeout=2) == 42
        with pytest.raises(RemoteError, match="ValueError: negative score -1"):
            await me.request("scorer-0", "score", -1, timeout=2)
        assert await me.request("scorer-0", "score", 1, timeout=2) == 2  # still serving
        left = asyncio.get_running_loop().create_future()
        await me.subscribe("left", lambda t, body, src: left.done() or left.set_result(body))
        in_flight = asyncio.ensure_future(me.request("scorer-0", "slow", 0.3, timeout=5))
        await asyncio.sleep(0.05)
        await actor.stop()
        assert await in_flight == "done" and actor.finished == [0.3]  # finished before leaving
        assert (await asyncio.wait_for(left, 2))["reason"] == "bye"
        await asyncio.wait_for(runner, 2)
        with pytest.raises(PeerGone):
            await me.request("scorer-0", "score", 1, timeout=2)
    finally:
        await me.close()
        await actor.stop()


async def test_run_uses_uvloop_and_stops_on_sigterm(broker):
    proc = await spawn_actor(broker.address, "echo-9", HB)
    me = BusClient(broker.address, "me", "test", heartbeat_interval=HB)
    await me.connect(timeout=5)
    try:
        left = asyncio.get_running_loop().create_future()
        await me.subscribe("left", lambda t, body, src: left.done() or left.set_result(body))
        reply = await me.request("echo-9", "echo", 1, timeout=5)
        assert reply["loop"].startswith("uvloop")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert (await asyncio.wait_for(left, 2))["reason"] == "bye"
    finally:
        await me.close()
        await kill(proc)
