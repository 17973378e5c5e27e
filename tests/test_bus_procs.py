"""The bus across real processes: a broker process, actor processes, SIGKILL, restart, CurveZMQ."""
import asyncio
import os
import subprocess
import sys
import socket
import time

import pytest

from bus.broker import Broker
from bus.client import BusClient
from bus.errors import BusTimeout, PeerGone
from bus.keys import generate_keys, load_keys
from bus_proc import kill, spawn_actor, spawn_broker

HB = 0.1
pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_request_reply_across_processes_and_sigkill_publishes_left():
    broker, address = await spawn_broker(heartbeat=HB)
    actor = None
    try:
        actor = await spawn_actor(address, "echo-1", HB)
        me = BusClient(address, "tester", "test", heartbeat_interval=HB)
        await me.connect(timeout=5)
        left = asyncio.get_running_loop().create_future()
        await me.subscribe("left", lambda t, body, src: left.done() or left.set_result((body, time.monotonic())))
        reply = await me.request("echo-1", "echo", {"q": 1}, timeout=5)
        assert reply["body"] == {"q": 1} and reply["src"] == "tester"
        assert reply["pid"] == actor.pid != os.getpid()

        hanging = asyncio.ensure_future(me.request("echo-1", "hang", None, timeout=30))
        await asyncio.sleep(0.1)
        killed_at = time.monotonic()
        await kill(actor)
        body, seen_at = await asyncio.wait_for(left, 5)
        # expiry window is liveness (3) x heartbeat (0.1 s) plus one expiry tick; allow scheduling slack
        assert body["name"] == "echo-1" and body["reason"] == "expired"
        assert seen_at - killed_at < 3 * HB + 0.5, f"left came {seen_at - killed_at:.2f}s after SIGKILL"
        with pytest.raises(PeerGone, match="echo-1"):  # the in-flight request fails now, not after 30 s
            await asyncio.wait_for(hanging, 2)
        with pytest.raises(PeerGone):
            await me.request("echo-1", "echo", 1, timeout=5)
        await me.close()
    finally:
        if actor is not None:
            await kill(actor)
        await kill(broker)


async def test_broker_restart_on_same_port_actors_reregister():
    bind = f"tcp://127.0.0.1:{free_port()}"
    broker, address = await spawn_broker(bind, HB)
    actor = None
    me = BusClient(address, "tester", "test", heartbeat_interval=HB)
    try:
        actor = await spawn_actor(address, "echo-1", HB)
        await me.connect(timeout=5)
        assert (await me.request("echo-1", "echo", 1, timeout=5))["body"] == 1
        first_session = me.broker_session
        await kill(broker)
        await asyncio.sleep(0.5)  # long enough for clients to notice the silence
        broker, _ = await spawn_broker(bind, HB)

        async def both_back():
            try:
                return {i.name for i in await me.actors(timeout=1)} == {"tester", "echo-1"}
            except BusTimeout:
                return False

        await wait_until(both_back, 10, "both actors to re-register")
        assert me.broker_session != first_session
        assert (await me.request("echo-1", "echo", 2, timeout=5))["body"] == 2
        # the restarted actor kept its name: a newcomer still cannot take it
        other = BusClient(address, "echo-1", "echo", heartbeat_interval=HB)
        with pytest.raises(Exception, match="already taken"):
            await other.connect(timeout=5)
    finally:
        await me.close()
        if actor is not None:
            await kill(actor)
        await kill(broker)


async def test_broker_restart_in_process_is_noticed_at_once():
    """A quick restart: the first heartbeat gets 'unknown sender' and the client registers again."""
    b = Broker(f"tcp://127.0.0.1:{free_port()}", heartbeat_interval=HB)
    await b.start()
    c = BusClient(b.address, "a", "t", heartbeat_interval=HB)
    await c.connect(timeout=5)
    await b.stop()
    b2 = Broker(b.bind, heartbeat_interval=HB)
    await b2.start()
    try:
        t = time.monotonic()
        while "a" not in b2.registry:
            assert time.monotonic() - t < 5, "client did not re-register"
            await asyncio.sleep(0.01)
    finally:
        await c.close()
        await b2.stop()


async def test_curve_refuses_unkeyed_and_foreign_clients(tmp_path):
    keys = load_keys(generate_keys(tmp_path / "keys"))
    stranger = load_keys(generate_keys(tmp_path / "other"))
    b = Broker("tcp://127.0.0.1:0", heartbeat_interval=HB, curve=keys)
    await b.start()
    ok = BusClient(b.address, "keyed", "tool", heartbeat_interval=HB, curve_server_key=keys.server_public,
                   curve_client_keys=keys.pair_for("tool"))
    try:  # a client left open would hang the garbage collector in zmq's Context.term (a later test's)
        await ok.connect(timeout=5)
        actor = await spawn_actor(b.address, "echo-1", HB, str(tmp_path / "keys"))
        try:
            assert (await ok.request("echo-1", "echo", "secret", timeout=5))["body"] == "secret"
        finally:
            await kill(actor)
        plain = BusClient(b.address, "plain", "t", heartbeat_interval=HB)
        with pytest.raises(BusTimeout, match="CurveZMQ, does this client hold the right keys"):
            await plain.connect(timeout=0.5)
        foreign = BusClient(b.address, "foreign", "t", heartbeat_interval=HB,
                            curve_server_key=keys.server_public, curve_client_keys=stranger.pair_for("tool"))
        with pytest.raises(BusTimeout, match="registration reply"):
            await foreign.connect(timeout=0.5)
        for _ in range(20):  # a refused handshake leaves no pipe for a moment: still a BusTimeout
            with pytest.raises(BusTimeout, match="CurveZMQ, does this client hold the right keys"):
                await BusClient(b.address, "plain", "t", heartbeat_interval=HB).connect(timeout=0.05)
        assert set(b.registry) == {"keyed"}
    finally:
        await ok.close()
        await b.stop()


def test_a_client_dropped_without_close_does_not_hang_the_garbage_collector():
    script = """
import asyncio, gc
from bus.broker import Broker
from bus.client import BusClient
async def main():
    b = Broker("tcp://127.0.0.1:0"); await b.start()
    c = BusClient(b.address, "dropped", "tool"); await c.connect(timeout=5)
    c.cycle = c  # as a failed test's frame holds it: collected by the cyclic collector only
    await b.stop()
asyncio.run(main())
gc.collect()
print("collected")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "collected", out.stderr
