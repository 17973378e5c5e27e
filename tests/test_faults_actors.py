"""Actor faults in one process over a real broker: a failed weight push, a failing decode step, a
step the learner is slow to take, a verifier gone before its GENERATED arrives, and rogue peers.

The other actors are bare bus clients in their role (`Peer`), so each test sees exactly the
messages the actor under test sends. Every wait has a deadline.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from actors import protocol as P
from bus.client import BusClient

HB = 0.2
WAIT = 10.0  # seconds any one expected message may take
pytestmark = pytest.mark.timeout(60)


class Peer:
    """A bus client in `role` that acknowledges and records every message of the given types."""

    def __init__(self, address: str, name: str, role: str, types=(), reply=None):
        self.client = BusClient(address, name, role, heartbeat_interval=HB)
        self.got: dict[str, asyncio.Queue] = defaultdict(asyncio.Queue)
        for t in types:
            self.client.on(t, lambda body, src, t=t: self._record(t, body, src, reply))

    def _record(self, type: str, body, src: str, reply):
        self.got[type].put_nowait(body)
        return reply(type, body, src) if reply else None

    async def next(self, type: str, timeout: float = WAIT):
        try:
            return await asyncio.wait_for(self.got[type].get(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.client.name}: no {type!r} within {timeout:g}s") from None

    def empty(self, type: str) -> bool:
        return self.got[type].empty()


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


@pytest.fixture
async def peer(broker):
    made: list[Peer] = []

    async def make(name: str, role: str, types=(), reply=None) -> Peer:
        p = Peer(broker.address, name, role, types, reply)
        await p.client.connect(timeout=5)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.client.close()


def _prompt(qid: str, step: int = 0) -> dict:
    return {"step": step, "qid": qid, "prompt_ids": [1, 5, 9], "n": 2, "sampling": {"max_new_tokens": 3},
            "answers": ["1"]}


# ----------------------------------------------------------------------------------------- torch generator

def _flaky_engine(backend, fail_first: int | None) -> list:
    """Make the engine's decode step raise: the first `fail_first` calls, or every call (None)."""
    step, calls = backend.engine.step, []

    def flaky(*args):
        calls.append(1)
        if fail_first is None or len(calls) <= fail_first:
            raise RuntimeError("injected: device-side assert")
        return step(*args)

    backend.engine.step = flaky
    return calls


async def test_a_failing_decode_step_rejects_its_rollouts_and_later_prompts_still_work(broker, peer):
    from actors.generator.generator import Generator
    from actors.generator.torch_backend import TorchBackend
    from policies.model.loading import tiny_model

    sampler = await peer("sampler", "sampler", [P.GENERATED, P.REJECTED])
    verifier = await peer("verifier-0", "verifier", [P.SCORE])
    await peer("packer", "packer")
    backend = TorchBackend(tiny_model())
    _flaky_engine(backend, fail_first=1)
    gen = Generator("generator-0", broker.address, backend=backend, tokenizer=FakeTokenizer(), heartbeat_interval=HB)
    await gen.start()
    try:
        await sampler.client.request("generator-0", P.GENERATE, _prompt("q1"), timeout=5)
        rejected = await sampler.next(P.REJECTED)
        assert rejected["qid"] == "q1" and "generator-0" in rejected["reason"] and "injected" in rejected["reason"]
        for qid in ("q1", "q2"):  # the same prompt dealt again, and a new one
            await sampler.client.request("generator-0", P.GENERATE, _prompt(qid), timeout=5)
            assert (await sampler.next(P.GENERATED))["qid"] == qid
            score = await verifier.next(P.SCORE)
            assert score["qid"] == qid and len(score["texts"]) == 2
        assert sampler.empty(P.REJECTED) and gen.bus.registered
    finally:
        await gen.stop()


async def test_an_engine_that_keeps_failing_makes_the_generator_leave(broker, peer):
    from actors.generator.generator import Generator
    from actors.generator.torch_backend import TorchBackend
    from policies.model.loading import tiny_model

    sampler = await peer("sampler", "sampler", [P.GENERATED, P.REJECTED])
    left: asyncio.Queue = asyncio.Queue()
    await sampler.client.subscribe(P.LEFT, lambda t, body, src: left.put_nowait(body["name"]))
    await peer("verifier-0", "verifier", [P.SCORE])
    backend = TorchBackend(tiny_model(), max_step_failures=2)
    _flaky_engine(backend, fail_first=None)
    gen = Generator("generator-0", broker.address, backend=backend, tokenizer=FakeTokenizer(), heartbeat_interval=HB)
    await gen.start()
    try:
        for qid in ("q1", "q2"):
            await sampler.client.request("generator-0", P.GENERATE, _prompt(qid), timeout=5)
            assert (await sampler.next(P.REJECTED))["qid"] == qid
        assert await asyncio.wait_for(left.get(), WAIT) == "generator-0"
        assert backend.failed is not None and sampler.empty(P.GENERATED)
    finally:
        await gen.stop()


async def test_a_group_the_backend_never_finishes_is_rejected_at_generate_timeout(broker, peer):
    from actors.generator.generator import Generator

    class Stuck:
        version = 0

        async def start(self): ...
        async def close(self): ...

        async def generate_group(self, rid, prompt_ids, n, sampling):
            await asyncio.Event().wait()

    sampler = await peer("sampler", "sampler", [P.REJECTED])
    gen = Generator("generator-0", broker.address, backend=Stuck(), tokenizer=FakeTokenizer(),
                    generate_timeout=0.3, heartbeat_interval=HB)
    await gen.start()
    try:
        await sampler.client.request("generator-0", P.GENERATE, _prompt("q1"), timeout=5)
        reason = (await sampler.next(P.REJECTED))["reason"]
        assert "generator-0" in reason and "q1" in reason and "generate_timeout=0.3s" in reason
    finally:
        await gen.stop()


# ----------------------------------------------------------------------------------------- packer and sampler

def _scored(qid: str, desc: dict, step: int = 0) -> dict:
    return {"step": step, "qid": qid, "rewards": [5.0, -5.0], "correct": [True, False], "reward_errors": 0,
            "rollout_ref": desc, "generator": "generator-0",
            "stats": {"truncated": [False, False], "response_tokens": [2, 2], "version_min": 0, "version_max": 0}}


async def test_a_step_the_learner_takes_after_batch_ttl_is_delivered_not_dropped(broker, peer):
    from actors.generator.generator import Sample, rollout_batch
    from actors.packer import Packer
    from tensors.channels import Channels, TensorOptions, open_channel

    await peer("sampler", "sampler", [P.ACCEPTED, P.REJECTED])
    verifier = await peer("verifier-0", "verifier")
    packer = Packer(broker.address, batch_prompts=1, batch_ttl=1.0, heartbeat_interval=HB)
    channel = open_channel("shm")
    batch = rollout_batch([1, 2, 3], [Sample([4, 5], [-0.5, -0.7], [0, 0], "stop")] * 2)
    try:
        await packer.start()
        await verifier.client.request("packer", P.SCORED, _scored("q-1", await channel.send(batch, timeout=30)),
                                      timeout=5)
        await asyncio.sleep(2.5)  # the learner is away for over two batch_ttl (restarting, or busy)
        learner = await peer("learner", "learner", [P.TRAIN])
        train = await learner.next(P.TRAIN)
        assert train["step"] == 0
        rx = Channels(TensorOptions(host="127.0.0.1"))
        trained = await rx.recv(train["batch_ref"], timeout=5)  # offered again: still there to read
        await rx.close()
        assert trained.meta["qids"] == ["q-1", "q-1"] and trained.input_ids.tolist() == batch.input_ids.tolist()
    finally:
        await packer.stop()
        await channel.close()


def _sampler(broker, **cfg):
    from policies.data.dataset import Problem
    from actors.sampler.sampler import PromptSampler, SamplerConfig
    return PromptSampler(broker.address, problems=[Problem("q-1", "1+0?", ["1"])], prompt_ids=[[1, 2, 3]],
                         cfg=SamplerConfig(**{"batch_prompts": 1, "group_size": 2, "total_batches": 1, "max_staleness": 0,
                                              "seed": 1, "sampling": {}, "request_timeout": 600.0, **cfg}),
                         heartbeat_interval=HB)


async def test_a_prompt_handed_to_a_verifier_that_left_is_dealt_again_at_once(broker, peer):
    announced = {"version": 0, "generators": ["generator-0"]}
    await peer("broadcaster", "broadcaster", [P.BROADCASTER_STATE], reply=lambda t, body, src: announced)
    gen = await peer("generator-0", "generator", [P.GENERATE])
    verifier = await peer("verifier-1", "verifier", [P.SCORE])
    sampler = _sampler(broker)  # request_timeout 600 s: nothing here may wait for it
    try:
        await sampler.start()
        first = await gen.next(P.GENERATE)
        assert first["qid"] == "q-1"
        # the verifier it names left before GENERATED arrived
        await gen.client.request("sampler", P.GENERATED, {"step": 0, "qid": "q-1", "verifier": "verifier-0"},
                                 timeout=5)
        assert (await gen.next(P.GENERATE))["qid"] == "q-1"
        # a verifier that was there and leaves later: its `left` event deals the prompt again
        await gen.client.request("sampler", P.GENERATED, {"step": 0, "qid": "q-1", "verifier": "verifier-1"},
                                 timeout=5)
        assert sampler.owed[(0, "q-1")].holder == "verifier-1"
        await verifier.client.close()
        assert (await gen.next(P.GENERATE))["qid"] == "q-1"
    finally:
        await sampler.stop()


# ----------------------------------------------------------------------------------------- weight broadcaster

async def test_a_generator_whose_weight_update_fails_once_gets_them_again_and_prompts_again(broker, peer):
    import torch

    from actors.weights.broadcaster import WeightBroadcaster, snapshot
    from tensors.channels import Channels, TensorOptions

    model = torch.nn.Linear(4, 3)
    rx = Channels(TensorOptions(host="127.0.0.1"))
    updates: dict[str, list] = {"generator-0": [], "generator-1": []}

    async def update(name: str, body: dict, fail: bool):
        weights = await rx.recv(body["weights_ref"], timeout=5)
        updates[name].append((body["version"], weights))
        if fail:
            raise RuntimeError("injected: out of memory loading the weights")
        return {"version": body["version"]}

    gen0 = await peer("generator-0", "generator", [P.GENERATE, P.UPDATE_WEIGHTS],
                      reply=lambda t, body, src: update("generator-0", body, fail=len(updates["generator-0"]) == 0)
                      if t == P.UPDATE_WEIGHTS else None)
    await peer("generator-1", "generator", [P.UPDATE_WEIGHTS],  # never takes them: retried a bounded number of times
               reply=lambda t, body, src: update("generator-1", body, fail=True))
    sampler = _sampler(broker)
    bc = WeightBroadcaster(broker.address, weights=snapshot(model), retry_attempts=3, retry_backoff=0.05,
                           update_timeout=20, heartbeat_interval=HB)
    try:
        await sampler.start()
        await bc.start()  # pushes v0: both fail; generator-0 takes the second copy
        assert (await gen0.next(P.GENERATE))["qid"] == "q-1"
        assert [v for v, _ in updates["generator-0"]] == [0, 0]
        assert all(torch.equal(w[k], v) for _, w in updates["generator-0"] for k, v in model.state_dict().items())
        assert bc.announced == {"version": 0, "generators": ["generator-0"]}
        assert sampler.generators == {"generator-0": 1}
        retry = bc._retries.get("generator-1")
        if retry is not None:
            await asyncio.wait_for(asyncio.shield(retry), WAIT)
        assert len(updates["generator-1"]) == 1 + 3  # the broadcast, then retry_attempts more: bounded
    finally:
        await bc.stop()
        await sampler.stop()
        await rx.close()


# ----------------------------------------------------------------------------------------- rogue bus members

def test_the_broker_knows_the_owner_of_every_control_topic():
    from bus.broker import BROKER_TOPICS, TOPIC_OWNERS
    assert set(BROKER_TOPICS) == {P.JOINED, P.LEFT}
    assert TOPIC_OWNERS == {P.WEIGHTS_VERSION: (P.BROADCASTER,), P.RUN_FINISHED: (P.LEARNER,),
                            P.METRICS: (P.LEARNER,)}


async def test_a_rogue_publishing_control_topics_is_refused_and_nothing_changes(broker, peer, caplog):
    announced = {"version": 0, "generators": ["generator-0"]}
    await peer("broadcaster", "broadcaster", [P.BROADCASTER_STATE], reply=lambda t, body, src: announced)
    await peer("generator-0", "generator", [P.GENERATE])
    heard: list = []
    watcher = await peer("watcher", "test", ["ping"])
    for topic in (P.LEFT, P.JOINED, P.WEIGHTS_VERSION, P.RUN_FINISHED, P.METRICS):
        await watcher.client.subscribe(topic, lambda t, body, src: heard.append((t, src)))
    sampler = _sampler(broker, total_batches=0)  # deals nothing: only its view of the generators matters
    rogue = await peer("rogue", "generator")
    try:
        await sampler.start()
        assert sampler.generators == {"generator-0": 0} and sampler.version == 0
        caplog.set_level("WARNING", logger="bus.client")
        await rogue.client.publish(P.LEFT, {"name": "generator-0", "role": "generator", "host": "", "pid": 0,
                                            "capabilities": {}, "reason": "bye"})
        await rogue.client.publish(P.JOINED, {"name": "ghost", "role": "generator"})
        await rogue.client.publish(P.WEIGHTS_VERSION, {"version": 99, "generators": []})
        await rogue.client.publish(P.RUN_FINISHED, {"step": 99})
        await rogue.client.publish(P.METRICS, {"step": 99})
        # the broker handles a connection's frames in order: once these answers are back, the
        # publications above were refused or delivered (and a subscriber's callback ran)
        await rogue.client.request("watcher", "ping", None, timeout=5)
        await rogue.client.request("sampler", P.SAMPLER_STATE, None, timeout=5)
        assert [h for h in heard if h[1] != ""] == []  # only the broker's own membership events came
        assert sampler.generators == {"generator-0": 0} and sampler.version == 0
        refused = [r.getMessage() for r in caplog.records
                   if r.name == "bus.client" and "broker refused" in r.getMessage()]
        assert len(refused) == 5 and "publication on 'left' from 'rogue'" in refused[0]
        assert "only the broker may publish it" in refused[0]
        assert "only members of role broadcaster may publish it" in refused[2]
    finally:
        await sampler.stop()


async def test_rogue_train_and_update_weights_are_refused(broker, peer, tmp_path):
    import msgpack

    from actors.generator.generator import Generator
    from actors.learner.learner import Learner, LearnerSettings
    from bus.errors import RemoteError
    from policies.train.ppo import PPOConfig

    class Recording:
        version = 0

        def __init__(self):
            self.updates = []

        async def start(self): ...
        async def close(self): ...

        async def update_weights(self, weights, version):
            self.updates.append(version)
            self.version = version

    backend = Recording()
    gen = Generator("generator-0", broker.address, backend=backend, tokenizer=FakeTokenizer(), heartbeat_interval=HB)
    settings = LearnerSettings(run_dir=tmp_path, total_steps=10, start_step=0, recompute=False, checkpoint_every=0,
                               keep_checkpoints=2)
    learner = Learner(broker.address, model=None, tokenizer=None, optimizer=None, ppo=PPOConfig(), settings=settings,
                      heartbeat_interval=HB)
    rogue = await peer("rogue", "verifier")
    packer = await peer("packer", "packer")
    try:
        await gen.start()
        await learner.start()
        from bus.errors import NotAllowed  # the broker refuses it before the learner sees it (bus/trust.py)
        with pytest.raises(NotAllowed, match=r"refused 'train' to 'learner' from 'rogue': it is registered "
                                             r"with role 'verifier'; only members of role packer may send it"):
            await rogue.client.request("learner", P.TRAIN, {"step": 0, "batch_ref": None, "stats": {}}, timeout=5)
        with pytest.raises(NotAllowed, match=r"refused 'update_weights' to.*only members of role broadcaster"):
            await rogue.client.request("generator-0", P.UPDATE_WEIGHTS, {"version": 7, "weights_ref": {}}, timeout=5)
        # claiming a role in the envelope does not help: the broker drops a frame with a key it did not add
        dropped = broker.stats["dropped"]
        rogue.client._send_frame(msgpack.packb({"v": 1, "type": P.TRAIN, "src": "rogue", "dst": "learner", "cid": 0,
                                                "body": {"step": 1, "batch_ref": None, "stats": {}}, "role": "packer"}))
        with pytest.raises(NotAllowed, match="refused 'train'"):  # a frame after it: the first was handled
            await rogue.client.request("learner", P.TRAIN, {"step": 2}, timeout=5)
        assert broker.stats["dropped"] == dropped + 2  # the forged frame and the refused request after it
        assert learner.pending == {} and backend.updates == []
        await packer.client.request("learner", P.TRAIN, {"step": 5, "batch_ref": None, "stats": {}}, timeout=5)
        assert list(learner.pending) == [5]  # the packer is served (step 5 waits for steps 0-4)
    finally:
        await learner.stop()
        await gen.stop()


async def test_an_unknown_sender_error_from_a_peer_does_not_make_a_client_register_again(broker, peer):
    from bus import envelope as E
    from bus.errors import BusError

    victim = await peer("victim", "sampler", ["ping"])
    rogue = await peer("rogue", "generator")
    forged = {"kind": "UnknownSender", "message": "this connection is not registered with the broker"}

    def answer_with_forged_error(env):
        rogue.client._send_frame(rogue.client._codec.pack(E.ERROR, "rogue", env.src, env.cid, forged))

    rogue.client._on_message = answer_with_forged_error
    # unasked, and as the answer to the victim's own request
    rogue.client._send_frame(rogue.client._codec.pack(E.ERROR, "rogue", "victim", 0, forged))
    await rogue.client.request("victim", "ping", None, timeout=5)  # handled after the forged error
    with pytest.raises(BusError, match="UnknownSender from 'rogue'"):
        await victim.client.request("rogue", "echo", None, timeout=5)
    assert victim.client.registered and victim.client._rereg_task is None


async def test_the_learner_stops_waiting_for_a_broadcaster_that_never_registers(broker, tmp_path):
    """Step s's weights go to the broadcaster over the bus; with none on the bus the learner says so within
    LearnerSettings.weights_timeout instead of waiting forever."""
    import time

    import torch

    from actors.learner.learner import Learner, LearnerSettings
    from policies.train.ppo import PPOConfig

    settings = LearnerSettings(run_dir=tmp_path, total_steps=10, start_step=0, recompute=False, checkpoint_every=0,
                               keep_checkpoints=2, weights_timeout=1.5)
    learner = Learner(broker.address, model=torch.nn.Linear(2, 2), tokenizer=None, optimizer=None, ppo=PPOConfig(),
                      settings=settings, heartbeat_interval=HB)
    try:
        await learner.start()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"no weight broadcaster registered on the bus within 1.5 s "
                                               r"to take the weights of version 3"):
            await learner.publish_weights(3)
        assert 1.5 <= time.monotonic() - t0 < 10
    finally:
        await learner.stop()


async def test_a_malformed_or_version_skewed_group_is_rejected_and_its_step_still_trained(broker, peer):
    """A group that would break its step (a stats field missing, tokens from a version newer than the
    step) is rejected at once, to be dealt again; its step is trained when the good copy comes. It
    used to be packed after the step counter moved and outside the error handling: the step was lost."""
    from actors.generator.generator import Sample, rollout_batch
    from actors.packer import Packer
    from tensors.channels import Channels, TensorOptions, open_channel

    sampler = await peer("sampler", "sampler", [P.ACCEPTED, P.REJECTED])
    verifier = await peer("verifier-0", "verifier")
    learner = await peer("learner", "learner", [P.TRAIN])
    packer = Packer(broker.address, batch_prompts=2, heartbeat_interval=HB)
    channel = open_channel("shm")
    good = rollout_batch([1, 2, 3], [Sample([4, 5], [-0.5, -0.7], [0, 0], "stop")] * 2)
    skewed = rollout_batch([1, 2, 3], [Sample([4, 5], [-0.5, -0.7], [0, 7], "stop")] * 2)

    async def score(qid: str, batch, drop: str | None = None) -> None:
        body = _scored(qid, await channel.send(batch, timeout=30))
        body["stats"].pop(drop, None)
        await verifier.client.request("packer", P.SCORED, body, timeout=5)

    try:
        await packer.start()
        await score("q-1", good)
        assert (await sampler.next(P.ACCEPTED))["qid"] == "q-1"
        await score("q-2", good, drop="response_tokens")  # a SCORED lacking a field
        rejected = await sampler.next(P.REJECTED)
        assert rejected["qid"] == "q-2" and "'response_tokens'" in rejected["reason"], rejected
        await score("q-2", skewed)  # dealt again, to a generator of another incarnation
        rejected = await sampler.next(P.REJECTED)
        assert rejected["qid"] == "q-2" and "policy version 7, newer than the step" in rejected["reason"], rejected
        assert learner.empty(P.TRAIN)
        await score("q-2", good)  # dealt again: the step completes
        assert (await sampler.next(P.ACCEPTED))["qid"] == "q-2"
        train = await learner.next(P.TRAIN)
        assert train["step"] == 0 and train["stats"]["groups"] == 2
        rx = Channels(TensorOptions(host="127.0.0.1"))
        trained = await rx.recv(train["batch_ref"], timeout=5)
        await rx.close()
        assert trained.meta["qids"] == ["q-1", "q-1", "q-2", "q-2"]
        assert sampler.empty(P.REJECTED) and packer.next_step == 1
    finally:
        await packer.stop()
        await channel.close()


async def test_rollouts_of_an_earlier_job_incarnation_are_refused_and_their_generator_goes_on(broker, peer):
    """A restart (or --resume) with a fixed bus.port: the generator outlives it, registers again and
    gets the new incarnation's prompts; what it made for the old one (same step and qid, weights that
    no longer exist) is ignored by the sampler and refused by the packer, never trained."""
    from actors.generator.generator import Sample, rollout_batch
    from actors.packer import Packer
    from tensors.channels import Channels, TensorOptions, open_channel

    announced = {"version": 0, "generators": ["generator-0"]}
    await peer("broadcaster", "broadcaster", [P.BROADCASTER_STATE], reply=lambda t, body, src: announced)
    gen = await peer("generator-0", "generator", [P.GENERATE])
    verifier = await peer("verifier-0", "verifier")
    learner = await peer("learner", "learner", [P.TRAIN])
    channel = open_channel("shm")
    made = {tag: rollout_batch([1, 2, 3], [Sample(ids, [-0.5, -0.7], [0, 0], "stop")] * 2)
            for tag, ids in (("old", [7, 7]), ("new", [4, 5]))}
    old = _sampler(broker)
    await old.start()
    stale = await gen.next(P.GENERATE)  # dealt by the first incarnation, which then ends
    await old.stop()
    sampler, packer = _sampler(broker), Packer(broker.address, batch_prompts=1, heartbeat_interval=HB)

    async def report(tag: str, epoch: str) -> None:
        await gen.client.request("sampler", P.GENERATED, {"step": 0, "qid": "q-1", "verifier": "verifier-0",
                                                          "epoch": epoch}, timeout=5)
        body = {**_scored("q-1", await channel.send(made[tag], timeout=30)), "epoch": epoch}
        await verifier.client.request("packer", P.SCORED, body, timeout=5)

    try:
        await sampler.start()
        await packer.start()
        fresh = await gen.next(P.GENERATE)  # the generator goes on in the new incarnation
        assert (fresh["step"], fresh["qid"]) == (stale["step"], stale["qid"]) and fresh["epoch"] != stale["epoch"]
        await report("old", stale["epoch"])
        assert sampler.owed[(0, "q-1")].holder == "generator-0" and learner.empty(P.TRAIN)
        await report("new", fresh["epoch"])
        train = await learner.next(P.TRAIN)
        rx = Channels(TensorOptions(host="127.0.0.1"))
        trained = await rx.recv(train["batch_ref"], timeout=5)
        await rx.close()
        assert trained.input_ids.tolist() == made["new"].input_ids.tolist()  # the old incarnation's never
    finally:
        await packer.stop()
        await sampler.stop()
        await channel.close()


async def test_the_learner_holds_a_bounded_number_of_steps_ahead(broker, peer, tmp_path):
    """TRAIN bodies of later steps used to pile up without bound; past max_pending the learner answers
    `later` (the packer offers the step again), but always takes the step it trains next."""
    import torch

    from actors.learner.learner import Learner, LearnerSettings
    from policies.train.ppo import PPOConfig

    settings = LearnerSettings(run_dir=tmp_path, total_steps=100, start_step=5, recompute=False, checkpoint_every=0,
                               keep_checkpoints=2, max_pending=2)
    learner = Learner(broker.address, model=torch.nn.Linear(2, 2), tokenizer=None, optimizer=None, ppo=PPOConfig(),
                      settings=settings, heartbeat_interval=HB)
    packer = await peer("packer", "packer")
    learner._wake.set = lambda: None  # nothing trains: the test looks at what is held
    try:
        await learner.start()
        replies = [await packer.client.request("learner", P.TRAIN, {"step": s, "batch_ref": None, "stats": {}},
                                               timeout=5) for s in (6, 7, 8, 7, 5)]
        assert replies == [None, None, {"later": True}, None, None]
        assert sorted(learner.pending) == [5, 6, 7]
    finally:
        await learner.stop()
