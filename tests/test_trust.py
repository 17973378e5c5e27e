"""A key is a role: keyed peers can be only what their key's class allows, and say only what that role may.

One keyed bus with the real broker and real clients: the honest packer, broadcaster and learner work
before and after a peer holding a generator key (what an attach host gets) tries to be each of them.
"""
from __future__ import annotations

import asyncio
import inspect
import os
from pathlib import Path

import pytest

from actors import protocol as P
from bus import trust
from bus.broker import Broker
from bus.client import BusClient
from bus.errors import NotAllowed
from bus.keys import client_kwargs, generate_keys, load_keys, write_subset

HB = 0.2


async def until(pred, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.01)


async def test_keyed_peers_claiming_packer_broadcaster_and_learner_are_refused_and_the_run_goes_on(tmp_path):
    head = generate_keys(tmp_path / "keys")
    attach = write_subset(head, ["generator"], tmp_path / "attach-keys")  # an attach host's directory
    assert sorted(p.name for p in attach.iterdir() if p.name.endswith("_secret")) == ["generator.key_secret"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in [head, attach, *head.iterdir(), *attach.iterdir()])
    assert load_keys(attach).server_secret is None  # the broker's secret stays on the head node

    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=HB, curve=load_keys(head))
    await broker.start()
    clients: list[BusClient] = []

    async def member(name: str, role: str, keys=head, **kw) -> BusClient:
        c = BusClient(broker.address, name, role, heartbeat_interval=HB, **client_kwargs(keys, kw.pop("as_", role)))
        clients.append(c)
        await c.connect(timeout=5)
        return c

    got: dict[str, list] = {"train": [], "update": [], "checkpoint": [], P.WEIGHTS_VERSION: [], P.RUN_FINISHED: []}
    try:
        learner = await member(P.LEARNER, P.LEARNER)
        learner.on(P.TRAIN, lambda body, src: got["train"].append((src, body)) or {"ok": True})
        learner.on(P.CHECKPOINT, lambda body, src: got["checkpoint"].append(src) or {"step": 0})
        gen = await member("generator-0", P.GENERATOR)
        gen.on(P.UPDATE_WEIGHTS, lambda body, src: got["update"].append((src, body)) or {"version": body["version"]})
        sampler = await member(P.SAMPLER, P.SAMPLER)
        for topic in (P.WEIGHTS_VERSION, P.RUN_FINISHED):
            await sampler.subscribe(topic, lambda t, body, src: got[t].append((src, body)))
        packer = await member(P.PACKER, P.PACKER)
        broadcaster = await member(P.BROADCASTER, P.BROADCASTER, as_=P.LEARNER)  # the learner's key

        # a generator key may not register any other role, nor take a role's name
        for name, role in [("packer-2", "packer"), ("bc-2", "broadcaster"), ("learner-2", "learner"),
                           ("launcher", "generator"), ("learner", "generator")]:
            rogue = BusClient(broker.address, name, role, heartbeat_interval=HB,
                              curve_server_key=load_keys(attach).server_public,
                              curve_client_keys=load_keys(attach).pair_for("generator"))
            clients.append(rogue)
            with pytest.raises(NotAllowed, match=rf"registration as role '{role}' from '{name}'"):
                await rogue.connect(timeout=5)
        # ... and what it may be, a generator, says nothing a generator may not
        evil = await member("generator-evil", P.GENERATOR, keys=attach)
        for dst, kind, body in [(P.LEARNER, P.TRAIN, {"step": 0, "batch_ref": None, "stats": {}}),
                                ("generator-0", P.UPDATE_WEIGHTS, {"version": 10**9, "weights_ref": {}}),
                                (P.LEARNER, P.CHECKPOINT, {})]:
            with pytest.raises(NotAllowed, match=rf"refused '{kind}' to '{dst}' from 'generator-evil'"):
                await evil.request(dst, kind, body, timeout=5)
        refusals = broker.stats["dropped"]
        await evil.publish(P.WEIGHTS_VERSION, {"version": 10**9, "generators": []})
        await evil.publish(P.RUN_FINISHED, {"step": 10**9})
        await until(lambda: broker.stats["dropped"] >= refusals + 2, "refusal of both publications")
        # a role's name is not squatted once its holder is gone (a broker restart, a crash)
        await learner.close()
        squat = BusClient(broker.address, P.LEARNER, P.GENERATOR, heartbeat_interval=HB,
                          **client_kwargs(attach, P.GENERATOR))
        clients.append(squat)
        with pytest.raises(NotAllowed, match="reserved for the member of role 'learner'"):
            await squat.connect(timeout=5)
        learner = await member(P.LEARNER, P.LEARNER)  # the real one comes back
        learner.on(P.TRAIN, lambda body, src: got["train"].append((src, body)) or {"ok": True})

        # attach's config question, asked with a generator-only directory, is answered by the real launcher
        launcher = await member(P.LAUNCHER, P.LAUNCHER)
        launcher.on(P.CONFIG, lambda body, src: {"config": "the job's", "src": src})
        asker = await member("attach-1", trust.TOOL, keys=attach)
        assert await asker.request(P.LAUNCHER, P.CONFIG, {}, timeout=5) == {"config": "the job's", "src": "attach-1"}

        # the run goes on: the honest members are served, and only they changed anything
        assert await packer.request(P.LEARNER, P.TRAIN, {"step": 0, "batch_ref": None, "stats": {}}, timeout=5)
        assert await broadcaster.request("generator-0", P.UPDATE_WEIGHTS, {"version": 1, "weights_ref": {}},
                                         timeout=5) == {"version": 1}
        await broadcaster.publish(P.WEIGHTS_VERSION, {"version": 1, "generators": ["generator-0"]})
        await until(lambda: got[P.WEIGHTS_VERSION], "honest weights.version")
        assert got == {"train": [(P.PACKER, {"step": 0, "batch_ref": None, "stats": {}})],
                       "update": [(P.BROADCASTER, {"version": 1, "weights_ref": {}})], "checkpoint": [],
                       P.WEIGHTS_VERSION: [(P.BROADCASTER, {"version": 1, "generators": ["generator-0"]})],
                       P.RUN_FINISHED: []}
        assert set(broker.registry) == {"learner", "generator-0", "sampler", "packer", "broadcaster",
                                        "generator-evil", "launcher", "attach-1"}
        assert {n: i.role for n, i in broker.registry.items()}["generator-evil"] == "generator"
    finally:
        for c in clients:
            await c.close()
        await broker.stop()


def test_the_trust_table_names_the_protocol_and_the_actors_agree(tmp_path):
    """bus/trust.py spells actors/protocol.py's names (bus imports nothing of actors/), and each actor's
    own refusal (`from_roles`) matches what the broker routes."""
    import importlib

    from actors.base import Actor
    for module in ("generator.generator", "generator.sim", "learner.learner", "packer", "sampler.sampler",
                   "verifier", "weights.broadcaster"):
        importlib.import_module(f"actors.{module}")

    names = {v for k, v in vars(P).items() if k.isupper() and isinstance(v, str)}
    assert set(trust.SENDERS) <= names and set(trust.TOPIC_OWNERS) <= names and trust.NAMED_ROLES <= names
    assert {r for roles in trust.KEY_ROLES.values() for r in roles} == {*P.ROLES, P.BROADCASTER, P.LAUNCHER,
                                                                         trust.TOOL}
    checked = 0
    classes, todo = set(), [Actor]
    while todo:
        classes |= set(subs := todo.pop().__subclasses__())
        todo += subs
    for cls in classes:
        for _, method in inspect.getmembers(cls, callable):
            roles = getattr(method, "__bus_from_roles__", None)
            kind = getattr(method, "__bus_handler__", None)
            if roles is not None and kind is not None:
                assert set(trust.SENDERS[kind]) == set(roles), (cls.__name__, kind)
                checked += 1
    assert checked >= 9

    old = tmp_path / "old"  # the one shared client key of before binds no role: refused, naming the fix
    generate_keys(old)
    (old / "client.key").write_bytes((old / "generator.key").read_bytes())
    with pytest.raises(ValueError, match=r"client.key, one key for every role.*launcher keys .* --force"):
        load_keys(old)
    attach = write_subset(generate_keys(tmp_path / "k2"), ["generator"], tmp_path / "a2")
    with pytest.raises(ValueError, match=r"holds no key for role 'packer': it needs packer.key_secret"):
        load_keys(attach).pair_for("packer")


async def test_each_remote_host_gets_its_own_roles_keys_and_plaintext_tensors_beyond_loopback_are_refused(
        tmp_path, monkeypatch):
    from launcher.config.schema import ConfigError, ExperimentConfig
    from launcher.job.hosts import Host
    from launcher.job.keyship import ship_keys
    from launcher.job.spawn import ProcessSpec
    from policies.settings import from_dict

    with pytest.raises(ConfigError, match=r"^tensors.bind: '0.0.0.0' listens beyond loopback.*bus.keys_dir"):
        from_dict(ExperimentConfig, {"tensors": {"bind": "0.0.0.0"}})
    from_dict(ExperimentConfig, {"tensors": {"bind": "0.0.0.0"}, "bus": {"keys_dir": str(tmp_path)}})

    # an `ssh` that runs the remote command here, with the host's own home
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/bash\nhost="${@: -2:1}"\nHOME="$FAKE_HOMES/$host" exec bash -c "${@: -1}"\n')
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_HOMES", str(tmp_path / "homes"))
    head = generate_keys(tmp_path / "keys")
    gen_host, learner_host = Host("gpu-1", 2), Host("gpu-2", 1)
    specs = [ProcessSpec("sampler", "sampler", ["x"]), ProcessSpec("generator-0", "generator", ["x"], gen_host),
             ProcessSpec("generator-1", "generator", ["x"], gen_host), ProcessSpec("learner", "learner", ["x"],
                                                                                   learner_host)]
    shipped = await ship_keys(str(head), specs)
    assert shipped[0].argv == ["x"]  # the head node's actors use bus.keys_dir
    dirs = {s.name: s.argv[-1] for s in shipped[1:]}
    assert all(s.argv[:2] == ["x", "--keys"] for s in shipped[1:]) and dirs["generator-0"] == dirs["generator-1"]
    for name, secret in [("generator-0", "generator"), ("learner", "learner")]:
        d = Path(dirs[name])
        assert str(d).startswith(str(tmp_path / "homes"))
        assert sorted(p.name for p in d.iterdir() if p.name.endswith("_secret")) == [f"{secret}.key_secret"]
        assert all(p.stat().st_mode & 0o077 == 0 for p in [d, *d.iterdir()])
        assert load_keys(d).server_secret is None and load_keys(d).authorized == load_keys(head).authorized


def test_a_tool_uses_whichever_key_its_directory_holds(tmp_path):
    head = generate_keys(tmp_path / "keys")
    attach = write_subset(head, ["generator"], tmp_path / "attach")
    assert client_kwargs(None) == {}
    assert client_kwargs(head)["curve_client_keys"] == load_keys(head).pair_for("launcher")
    assert client_kwargs(attach)["curve_client_keys"] == load_keys(head).pair_for("generator")  # attach's config ask
