"""Envelope codec, registry and key files: the pure parts of the bus."""
import pickle

import msgpack
import pytest

from bus.envelope import SCHEMA_VERSION, Envelope, decode, encode
from bus.errors import BusTimeout, NameTaken, PeerGone, ProtocolError, RemoteError, error_body, error_from_body
from bus.keys import generate_keys, load_keys
from bus.registry import ActorInfo, Registry


def test_roundtrip_keeps_every_field():
    env = Envelope("score", "gen-0", "verifier-1", 42, {"ids": [1, 2], "blob": b"\x00\xff", 3: 1.5})
    out = decode(encode(env))
    assert out == env and out.v == SCHEMA_VERSION


def _frame(**over):
    m = {"v": SCHEMA_VERSION, "type": "t", "src": "a", "dst": "b", "cid": 0, "body": None}
    m.update(over)
    return msgpack.packb({k: v for k, v in m.items() if v is not ...})


@pytest.mark.parametrize("frame, reason", [
    (b"\xc1garbage", "not msgpack"),
    (msgpack.packb([1, 2]), "is a list"),
    (_frame(v=2), "schema version 2"),
    (_frame(v=True), "schema version"),
    (_frame(cid=...), "missing ['cid']"),
    (_frame(extra=1), "unexpected"),
    (_frame(type=""), "type must be"),
    (_frame(type=7), "type must be"),
    (_frame(src=b"a"), "src must be"),
    (_frame(dst=None), "dst must be"),
    (_frame(cid=-1), "cid must be"),
    (_frame(cid=False), "cid must be"),
])
def test_decode_names_the_defect(frame, reason):
    with pytest.raises(ProtocolError, match="bad bus frame") as e:
        decode(frame)
    assert reason in e.value.reason


def test_encode_refuses_unserialisable_body():
    with pytest.raises(ProtocolError, match="not msgpack-serialisable"):
        encode(Envelope("t", "a", "b", 1, {"x": object()}))


def test_errors_pickle_and_cross_the_wire():
    for exc in [BusTimeout("gen-0", "reply to 'x'", 2.0), PeerGone("gen-1"), NameTaken("a", "held"),
                RemoteError("v", "score", "ValueError: no")]:
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)
    back = error_from_body(error_body(RemoteError("v", "score", "boom")), "v")
    assert isinstance(back, RemoteError) and (back.peer, back.type, back.message) == ("v", "score", "boom")
    assert "gen-0" in str(BusTimeout("gen-0", "reply to 'x'", 2.0))


def test_registry_name_session_and_expiry():
    r = Registry()
    info = ActorInfo("gen-0", "generator", "h", 1)
    e, new = r.register(b"id1", info, "s1", ttl=0.3, topics=["weights.version"], now=0.0)
    assert new and r.subscribers["weights.version"] == {b"id1": None}
    with pytest.raises(NameTaken, match="gen-0"):
        r.register(b"id2", ActorInfo("gen-0", "generator", "h", 2), "s2", 0.3, [], now=0.1)
    # same session from a new connection (broker restart or reconnect): takes over, not new
    e2, new = r.register(b"id3", ActorInfo("gen-0", "generator", "h", 1), "s1", 0.3, ["x"], now=0.2)
    assert not new and r.by_ident.keys() == {b"id3"} and "weights.version" not in r.subscribers
    assert r.expire(now=0.4) == [] and r.expire(now=0.6) == [e2] and not r.by_name and not r.subscribers


def test_actor_info_validation():
    with pytest.raises(ProtocolError, match="name"):
        ActorInfo.from_wire({"name": "_x", "role": "r"})
    with pytest.raises(ProtocolError, match="capabilities"):
        ActorInfo.from_wire({"name": "x", "role": "r", "capabilities": [1]})


def test_keys_generate_and_load(tmp_path):
    d = generate_keys(tmp_path / "k")
    keys = load_keys(d)
    gen = keys.pair_for("generator")
    assert len(keys.server_public) == 40 and keys.server_secret and gen[0] in keys.authorized
    assert keys.server_public not in keys.authorized
    assert keys.roles_of(gen[0]) == {"generator", "tool"} and keys.pair_for("broadcaster") == keys.pair_for("learner")
    assert all(p.stat().st_mode & 0o077 == 0 for p in d.iterdir()) and d.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError, match="already exist"):
        generate_keys(d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_keys(tmp_path / "nope")


async def test_deadlines_fire_in_order_and_skip_answered():
    import asyncio
    from types import SimpleNamespace

    from bus.deadlines import Deadlines

    loop = asyncio.get_running_loop()
    live, fired = {}, []
    d = Deadlines(loop, live, lambda k: (fired.append(k), live.pop(k)), granularity=0.005)
    t0 = loop.time()
    for key, delay in [(1, 0.2), (2, 0.05), (3, 0.1), (4, 0.12)]:
        live[key] = SimpleNamespace(deadline=t0 + delay)
        d.add(key, t0 + delay)
    del live[3]  # answered before its deadline: must not fire
    await asyncio.sleep(0.15)
    assert fired == [2, 4]
    await asyncio.sleep(0.1)
    assert fired == [2, 4, 1] and d.timer is None


@pytest.mark.parametrize("header", [b"\x86", b"\xde\x00\x06", b"\xdf\x00\x00\x00\x06"])
def test_stamp_role_adds_the_senders_role_that_a_client_cannot_set(header):
    from bus.envelope import decode_trusted, stamp_role
    frame = encode(Envelope("train", "packer", "learner", 3, {"step": 1}))
    frame = header + frame[1:]  # the same six entries under each map header msgpack allows
    env = decode(frame)
    assert decode_trusted(stamp_role(frame, env, "packer")) == Envelope("train", "packer", "learner", 3,
                                                                        {"step": 1}, role="packer")
    with pytest.raises(ProtocolError, match="unexpected .*role"):  # the broker refuses a claimed role
        decode(_frame(role="packer"))
