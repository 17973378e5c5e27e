"""Broker + clients in one process (the broker loop in its thread): routing, errors, pub/sub."""
import asyncio
import logging
import time

import pytest
import zmq

from bus.broker import Broker
from bus.client import BusClient
from bus.errors import BusError, BusTimeout, MessageTooLarge, NameTaken, PeerGone, RemoteError

HB = 0.1
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def broker(request):
    b = Broker(heartbeat_interval=getattr(request, "param", HB), max_message_bytes=64 * 1024)
    await b.start()
    yield b
    await b.stop()


@pytest.fixture
async def connect(broker):
    clients = []

    async def make(name, role="test", **kw):
        c = BusClient(broker.address, name, role, heartbeat_interval=broker.heartbeat_interval, **kw)
        await c.connect(timeout=5)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


async def wait_for(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_request_reply_send_and_remote_error(connect):
    a, b = await connect("a"), await connect("b")
    got = []

    async def echo(body, src):
        return {"body": body, "src": src}

    def fail(body, src):
        raise ValueError(f"cannot score {body}")

    async def fail_later(body, src):
        await asyncio.sleep(0.01)
        raise KeyError(body)

    b.on("echo", echo)
    b.on("fail", fail)
    b.on("fail_later", fail_later)
    b.on("note", lambda body, src: got.append((body, src)))
    assert await a.request("b", "echo", {"x": [1, 2.5, b"\x00"]}, timeout=2) == {"body": {"x": [1, 2.5, b"\x00"]},
                                                                                "src": "a"}
    with pytest.raises(RemoteError, match="cannot score 7") as e:
        await a.request("b", "fail", 7, timeout=2)
    assert e.value.peer == "b" and e.value.type == "fail"
    with pytest.raises(RemoteError, match="KeyError: 'k'"):
        await a.request("b", "fail_later", "k", timeout=2)
    with pytest.raises(RemoteError, match="no handler for 'nope'"):
        await a.request("b", "nope", None, timeout=2)
    await a.send("b", "note", 3)
    await wait_for(lambda: got == [(3, "a")])
    assert await a.request("b", "echo", 1, timeout=2) == {"body": 1, "src": "a"}  # b survived its failures


# 500 requests in this one loop can hold up a client's heartbeats past 3 x 0.1 s (the broker then drops it)
@pytest.mark.parametrize("broker", [1.0], indirect=True)
async def test_many_requests_in_flight_match_their_replies(connect):
    a, b = await connect("a"), await connect("b")

    async def square(x, src):
        await asyncio.sleep(0.001 * (x % 5))  # replies come back out of order
        return x * x

    b.on("square", square)
    assert await asyncio.gather(*[a.request("b", "square", i, timeout=5) for i in range(500)]) == \
        [i * i for i in range(500)]


async def test_pubsub_and_membership_events(connect):
    watcher = await connect("watcher")
    events, versions = [], []
    await watcher.subscribe("joined", lambda t, body, src: events.append((t, body["name"], body["role"])))
    await watcher.subscribe("left", lambda t, body, src: events.append((t, body["name"], body["role"])))
    gen = await connect("gen-0", role="generator", capabilities={"backend": "torch"})
    await gen.subscribe("news", lambda t, body, src: versions.append((body, src)))
    await watcher.publish("news", {"version": 3})
    await wait_for(lambda: versions == [({"version": 3}, "watcher")])
    listed = await watcher.actors(role="generator")
    assert [(i.name, i.capabilities) for i in listed] == [("gen-0", {"backend": "torch"})]
    await gen.close()
    await wait_for(lambda: ("left", "gen-0", "generator") in events)
    assert events == [("joined", "gen-0", "generator"), ("left", "gen-0", "generator")]


async def test_duplicate_name_is_refused_until_it_leaves(connect):
    first = await connect("learner", "learner")
    with pytest.raises(NameTaken, match="'learner' is already taken"):
        await connect("learner", "learner")
    await first.close()
    again = await connect("learner", "learner")
    assert again.registered


async def test_unknown_and_departed_peers_fail_fast(connect):
    a, b = await connect("a"), await connect("b")
    t = time.monotonic()
    with pytest.raises(PeerGone, match="'ghost'"):
        await a.request("ghost", "echo", 1, timeout=10)
    await b.close()
    with pytest.raises(PeerGone, match="'b'"):
        await a.request("b", "echo", 1, timeout=10)
    assert time.monotonic() - t < 1.0


async def test_timeout_names_the_peer_and_the_message(connect):
    a, slow = await connect("a"), await connect("slow-gen")

    async def never(body, src):
        await asyncio.sleep(60)

    slow.on("work", never)
    t = time.monotonic()
    with pytest.raises(BusTimeout, match=r"0\.3s waiting for reply to 'work' from 'slow-gen'") as e:
        await a.request("slow-gen", "work", 1, timeout=0.3)
    assert e.value.peer == "slow-gen" and 0.28 < time.monotonic() - t < 1.0


async def test_oversized_messages_are_refused(broker, connect, caplog):
    a, b = await connect("a"), await connect("b")
    seen = []
    b.on("blob", lambda body, src: seen.append(len(body)))
    with pytest.raises(MessageTooLarge, match=r"exceeds the bus limit of 65536 bytes"):
        await a.request("b", "blob", b"x" * 70_000, timeout=2)
    # a client that ignores the limit: the broker drops the frame, logs it and tells the sender
    a.max_message_bytes = 1 << 20
    with caplog.at_level(logging.WARNING, logger="bus.broker"):
        with pytest.raises(MessageTooLarge, match="70"):
            await a.request("b", "blob", b"x" * 70_000, timeout=2)
    assert "exceeds the bus limit" in caplog.text and broker.stats["dropped"] >= 1
    await a.send("b", "blob", b"x" * 1000)
    await wait_for(lambda: seen == [1000])


async def test_garbage_from_a_raw_socket_is_dropped(broker, connect, caplog):
    a, b = await connect("a"), await connect("b")
    b.on("echo", lambda body, src: body)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(broker.address)
    with caplog.at_level(logging.WARNING, logger="bus.broker"):
        raw.send(b"\x93not msgpack at all")
        raw.send_multipart([b"two", b"frames"])
        await wait_for(lambda: broker.stats["dropped"] >= 2)
    assert "not msgpack" in caplog.text and "2 frames, expected 1" in caplog.text
    assert await a.request("b", "echo", "still here", timeout=2) == "still here"
    raw.close()
    ctx.term()


async def test_non_loopback_bind_needs_keys_or_insecure():
    with pytest.raises(ValueError, match="without CurveZMQ keys"):
        Broker("tcp://0.0.0.0:0")
    b = Broker("tcp://0.0.0.0:0", insecure=True, heartbeat_interval=HB)
    await b.start()
    try:
        port = b.address.rsplit(":", 1)[1]
        c = BusClient(f"tcp://127.0.0.1:{port}", "a", "t", heartbeat_interval=HB)
        await c.connect(timeout=5)
        assert "a" in b.registry
        await c.close()
    finally:
        await b.stop()


async def test_bind_conflict_is_a_clear_error(broker):
    with pytest.raises(BusError, match="cannot bind"):
        await Broker(broker.address).start()


async def test_connect_to_nothing_times_out_naming_the_broker():
    c = BusClient("tcp://127.0.0.1:1", "a", "t", heartbeat_interval=HB)
    with pytest.raises(BusTimeout, match=r"broker at tcp://127.0.0.1:1.*is the broker running"):
        await c.connect(timeout=0.3)
