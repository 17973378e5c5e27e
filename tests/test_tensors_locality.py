"""One place decides the channel for a peer; zmq tensor sockets are bounded and, with keys, closed to strangers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import zmq

from tensors.channels import Channels, Curve, TensorOptions
from tensors.channels.locality import bus_host, route_address
from tensors.channels.outbox import Puller
from tensors.errors import TransferError


@dataclass
class Peer:
    host: str
    pid: int


def test_the_channel_follows_the_peer_locality():
    ch = Channels(TensorOptions(host="10.0.0.1"))
    me = os.getpid()
    assert ch.kind_for([Peer("10.0.0.1", me)]) == "local"
    assert ch.kind_for([Peer("10.0.0.1", me + 1)]) == "shm"
    assert ch.kind_for([Peer("10.0.0.2", me)]) == "zmq"  # same pid number on another host is another process
    # one payload for several peers: the kind that reaches all of them
    assert ch.kind_for([Peer("10.0.0.1", me), Peer("10.0.0.1", me + 1)]) == "shm"
    assert ch.kind_for([Peer("10.0.0.1", me + 1), Peer("10.0.0.3", 7)]) == "zmq"
    with pytest.raises(ValueError, match="no peer"):
        ch.kind_for([])


def test_a_process_is_known_by_its_address_towards_the_bus():
    assert bus_host("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert bus_host("tcp://[::1]:5555") == "::1"
    assert route_address("127.0.0.1") == "127.0.0.1"
    opts = TensorOptions.for_bus("tcp://127.0.0.1:5555")
    assert opts.host == "127.0.0.1" and opts.zmq_opts()["bind"] == "tcp://127.0.0.1:0"
    assert TensorOptions(host="10.0.0.1", bind="0.0.0.0").zmq_opts()["advertise"] == "10.0.0.1"


def _curve(authorized=()) -> Curve:
    public, secret = zmq.curve_keypair()
    return Curve(public, secret, frozenset(authorized))


async def test_curve_tensor_sockets_serve_only_authorised_keys():
    member = _curve()
    member = Curve(member.public, member.secret, frozenset({member.public}))  # the job's shared client pair
    sender = Channels(TensorOptions(host="127.0.0.1", curve=member))
    payload = {"w": torch.arange(1000, dtype=torch.float32)}
    try:
        desc = await sender.send(payload, [Peer("127.0.0.2", 1)] * 3, timeout=30)
        assert desc["kind"] == "zmq" and desc["server_key"] == member.public.decode()  # z85, as zmq makes them

        friend = Channels(TensorOptions(host="127.0.0.2", curve=member))
        got = await friend.recv(desc, timeout=10)
        assert torch.equal(got["w"], payload["w"])
        await friend.close()

        keyless = Channels(TensorOptions(host="127.0.0.2"))
        with pytest.raises(TransferError) as e:
            await keyless.recv(desc, timeout=2)
        assert e.value.phase == "keys" and "CurveZMQ" in str(e.value)
        await keyless.close()
        plain = Puller()  # one that ignores the descriptor's server key and dials in plaintext
        with pytest.raises(TransferError) as e:
            await plain.request(desc["endpoint"], b"GET", desc["id"], peer="sender", timeout=2)
        plain.close()

        stranger = Channels(TensorOptions(host="127.0.0.2", curve=_curve()))  # knows the server key, not authorised
        with pytest.raises(TransferError) as e:
            await stranger.recv(desc, timeout=2)
        assert e.value.phase == "auth" and "refused this process's CurveZMQ key" in str(e.value)
        await stranger.close()
    finally:
        await sender.close()


async def test_a_frame_over_the_receivers_limit_drops_the_transfer_not_the_receiver():
    sender = Channels(TensorOptions(host="127.0.0.1"))
    small = Channels(TensorOptions(host="127.0.0.2", max_frame_bytes=4096))
    try:
        big = await sender.send({"x": torch.zeros(16384)}, [Peer("127.0.0.2", 1)], timeout=30)
        with pytest.raises(TransferError) as e:
            await small.recv(big, timeout=5)
        assert e.value.phase in ("pull", "connect")
        ok = await sender.send({"x": torch.ones(16)}, [Peer("127.0.0.2", 1)], timeout=30)
        assert torch.equal((await small.recv(ok, timeout=5))["x"], torch.ones(16))
    finally:
        await sender.close()
        await small.close()
