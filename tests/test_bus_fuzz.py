"""Fuzz the broker with garbage through a raw DEALER; normal traffic must keep flowing."""
import asyncio
import threading

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.broker import Broker
from bus.client import BusClient
from bus.envelope import SCHEMA_VERSION

pytestmark = pytest.mark.timeout(90)

leaves = st.none() | st.booleans() | st.integers(-2**64, 2**64 - 1) | st.floats() | st.text(max_size=8) | \
    st.binary(max_size=8)
values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                      max_leaves=8)
names = st.sampled_from(["", "a", "b", "fuzz", "_x"]) | st.text(max_size=6)
types = st.sampled_from(["_reg", "_hb", "_bye", "_sub", "_unsub", "_actors", "_reply", "_error", "_pub", "_hback",
                         "echo", "_nope"]) | st.text(max_size=6)
register_bodies = st.fixed_dictionaries({
    "info": st.fixed_dictionaries({"name": names, "role": names}) | values,
    "session": st.text(max_size=4) | values, "heartbeat_interval": st.floats() | values,
    "topics": st.lists(st.text(max_size=4), max_size=2) | values})


def pack(obj):
    try:
        return msgpack.packb(obj)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"


envelopes = st.fixed_dictionaries({
    "v": st.sampled_from([SCHEMA_VERSION, SCHEMA_VERSION, 0, 2, "1"]), "type": types, "src": names, "dst": names,
    "cid": st.integers(-1, 2**64 - 1) | values, "body": values | register_bodies}).map(pack)
random_maps = st.dictionaries(st.sampled_from(["v", "type", "src", "dst", "cid", "body"]) | st.text(max_size=3),
                              values, max_size=7).map(pack)
frames = st.binary(max_size=256) | random_maps | envelopes
messages = st.lists(frames, min_size=1, max_size=3)  # >1 frame = wrong frame count


class Harness:
    """A broker and two clients on an event loop in a background thread, driven synchronously."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._setup())
        self.ctx = zmq.Context()
        self.raw = self.ctx.socket(zmq.DEALER)
        self.raw.linger = 0
        self.raw.connect(self.broker.address)

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _setup(self):
        self.broker = Broker(heartbeat_interval=0.2)
        await self.broker.start()
        self.a = BusClient(self.broker.address, "a", "t", heartbeat_interval=0.2)
        self.b = BusClient(self.broker.address, "b", "t", heartbeat_interval=0.2)
        await self.a.connect(timeout=5)
        await self.b.connect(timeout=5)
        self.a.on("echo", lambda body, src: [body, src])

    async def _teardown(self):
        await self.a.close()
        await self.b.close()
        await self.broker.stop()

    def close(self):
        self.raw.close()
        self.ctx.term()
        self.run(self._teardown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_garbage_never_stops_the_broker():
    h = Harness()
    count = [0]
    try:
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(batch=st.lists(messages, min_size=1, max_size=4))
        def check(batch):
            for parts in batch:
                h.raw.send_multipart(parts)
            while h.raw.poll(0):  # drain whatever the broker answered the fuzzer
                h.raw.recv_multipart()
            count[0] += 1
            assert h.run(h.b.request("a", "echo", count[0], timeout=3)) == [count[0], "b"]

        check()
        assert h.broker._thread.is_alive() and h.broker.stats["dropped"] > 0
        assert {"a", "b"} <= set(h.broker.registry)
    finally:
        h.close()
