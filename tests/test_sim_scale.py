"""Simulated compute: the cost model, the sim backend's weight-update semantics, and a sim job through
the real launcher with 20 simulated generators in 10 processes, one process SIGKILLed mid-run: every
prompt of every step is still trained exactly once."""
from __future__ import annotations

import asyncio
import glob
import os
import random
import signal

import pytest

from actors.generator.sim import SimBackend
from launcher.config import ConfigError, load_config
from launcher.job.metrics import read_metrics
from policies.cost_model import CostModel
from policies.verify.verifier import is_correct
from tensors.channels.shm import shm_directory
from tests.launch_util import dataset
from tests.test_faults import HB, assert_exactly_once, job_args, jobs  # noqa: F401 (jobs: the fixture)


@pytest.fixture(scope="module")
def tok():
    from policies.model.loading import load_tokenizer, smollm2_dir
    return load_tokenizer(smollm2_dir())


# ------------------------------------------------------------------------------------ the cost model

def test_cost_model_lengths_are_capped_and_their_mean_is_the_closed_form():
    cost = CostModel(response_median=2000, response_sigma=1.0, max_response_tokens=27000)
    rng = random.Random(0)
    lens = [cost.response_length(rng) for _ in range(40000)]
    assert max(lens) == 27000 and min(lens) >= 1  # the tail reaches the cap
    assert abs(sum(lens) / len(lens) / cost.mean_response_tokens() - 1) < 0.02


def test_cost_model_ideal_is_the_sum_synchronously_and_the_pipeline_bound_otherwise():
    kw = dict(batch_prompts=16, group_size=4, generators=8, prompt_tokens=50)
    cost = CostModel(learner_s_per_token=1e-4, response_sigma=0.5)
    sync = cost.ideal(**kw, max_staleness=0)
    assert sync["step"] == pytest.approx(sync["generate"] + sync["train"] + sync["sync"])
    assert sync["generate"] > sync["saturated"]  # the longest responses set a batch's time
    # training the slower side: the learner sets the pace once generation overlaps it
    slow = CostModel(learner_s_per_token=2e-4 * sync["generate"] / sync["train"], response_sigma=0.5)
    t = slow.ideal(**kw, max_staleness=1)
    assert t["train"] > t["generate"] and t["step"] == pytest.approx(t["train"] + t["sync"])
    # balanced: the slower of the two, plus the sync
    balanced = CostModel(learner_s_per_token=1e-4 * sync["generate"] / sync["train"], response_sigma=0.5)
    b = balanced.ideal(**kw, max_staleness=2)
    assert b["train"] == pytest.approx(b["generate"]) and b["step"] == pytest.approx(b["train"] + b["sync"])
    # generation twice training, staleness 1: k+1 steps hold a batch's generation, training and sync
    fast = CostModel(learner_s_per_token=0.5e-4 * sync["generate"] / sync["train"], response_sigma=0.5)
    f = fast.ideal(**kw, max_staleness=1)
    assert f["step"] == pytest.approx((f["generate"] + f["train"] + f["sync"]) / 2)


def test_sim_config_errors_name_the_key():
    for override, key in [("sim.accuracy=1.5", "sim.accuracy"), ("sim.token_scale=0", "sim.token_scale"),
                          ("actors.generator.per_process=4", "actors.generator.per_process"),
                          ("actors.learner.mode=sim", "actors.learner.mode")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"actors\.learner\.ranks.*learner\.mode sim"):
        load_config(None, ["actors.generator.backend=sim", "actors.learner.mode=sim", "actors.learner.ranks=2"])


# ------------------------------------------------------------------------------------ the sim backend

def _backend(tok, interrupt: bool, **cost) -> SimBackend:
    base = dict(decode_step_s=0.01, response_median=60, response_sigma=0.0, prefill_s_per_token=0.0,
                sync_s_per_gb=0.0, accuracy=0.0)
    return SimBackend(CostModel(**{**base, **cost}), tok, interrupt_on_update=interrupt)


def test_interrupting_update_reaches_running_sequences(tok):
    async def go():
        b = _backend(tok, True)
        await b.start()
        group = asyncio.ensure_future(b.generate_group("r", [1, 2, 3], 2, {}))
        await asyncio.sleep(0.2)  # a third of the way (60 tokens at 10 ms)
        await b.update_weights({}, 1)
        assert not group.done()  # applied at once, mid-sequence
        samples = await group
        await b.close()
        return samples

    for s in asyncio.run(go()):
        assert s.versions == sorted(s.versions) and set(s.versions) == {0, 1}, s.versions
        assert len(s.output_ids) == 60 and s.finish_reason == "stop"


def test_deferred_update_waits_for_running_sequences_and_holds_new_ones(tok):
    async def go():
        b = _backend(tok, False)
        await b.start()
        first = asyncio.ensure_future(b.generate_group("a", [1, 2, 3], 2, {}))
        await asyncio.sleep(0.2)
        update = asyncio.ensure_future(b.update_weights({}, 1))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(b.generate_group("b", [1, 2, 3], 2, {}))  # arrives while it waits
        await update
        assert first.done() and not second.done()  # the update came after the running ones ended
        out = await first, await second
        await b.close()
        return out

    first, second = asyncio.run(go())
    assert all(set(s.versions) == {0} for s in first)  # each sequence one version
    assert all(set(s.versions) == {1} for s in second)


def test_accuracy_boxes_the_reference_that_the_verifier_accepts(tok):
    async def go(accuracy):
        b = _backend(tok, True, accuracy=accuracy, decode_step_s=1e-4)
        await b.start()
        b.answers["r"] = ["42"]
        samples = await b.generate_group("r", [1, 2], 8, {})
        await b.close()
        return [tok.decode(s.output_ids) for s in samples]

    assert all(is_correct(t, "42") for t in asyncio.run(go(1.0)))
    assert not any(is_correct(t, "42") for t in asyncio.run(go(0.0)))


# ------------------------------------------------------------------------------------ through the launcher

def test_sim_generators_share_processes_in_the_launchers_plan(tmp_path):
    from launcher.job.start import Start
    from launcher.job.plan import process_specs
    cfg = load_config(None, ["actors.generator.backend=sim", "actors.generator.count=10",
                             "actors.generator.per_process=4"])
    specs = [s for s in process_specs(cfg, tmp_path / "c.yaml", "tcp://127.0.0.1:1", Start(0, "m"), None)
             if s.role == "generator"]
    assert [(s.name, s.argv[s.argv.index("--instances") + 1]) for s in specs] == [
        ("generator-0", "4"), ("generator-4", "4"), ("generator-8", "2")]


@pytest.mark.timeout(180)
def test_sim_job_trains_every_prompt_once_when_a_tenth_of_the_generators_is_sigkilled(tmp_path, jobs):  # noqa: F811
    train = dataset(tmp_path, n_train=96)  # 4 batches of 20 within one epoch: no problem twice
    run_dir = tmp_path / "run"
    steps, prompts, group = 4, 20, 2
    job = jobs(job_args(run_dir, train, **{
        "train.steps": steps, "rollout.batch_prompts": prompts, "rollout.group_size": group,
        "rollout.max_staleness": 1, "actors.generator.backend": "sim", "actors.generator.count": 20,
        "actors.generator.per_process": 2, "actors.learner.mode": "sim", "sim.token_scale": 100,
        "sim.decode_step_s": 0.03, "sim.time_scale": 0.02, "sim.learner_s_per_token": 5e-4}))
    found = job.wait_actors({f"generator-{i}" for i in range(20)}, timeout=120)
    victim = found["generator-2"].pid
    assert found["generator-3"].pid == victim and found["generator-4"].pid != victim  # two a process
    job.wait_for(r"\[sampler\].*batch 2 admitted", 90)  # step 0 trained; batches 1 and 2 dealt
    os.kill(victim, signal.SIGKILL)
    rc = job.finish(120)
    assert rc == 0, job.tail()
    out = job.output()
    assert "generator-2 (generator) left the bus" in out and "generator-3 (generator) left the bus" in out
    left = glob.glob(os.path.join(shm_directory(), f"boba-shm-{victim}-*"))
    assert not left, f"the killed process's shm segments outlived the job: {left}"

    records = read_metrics(run_dir)
    assert_exactly_once(run_dir, train, batch_prompts=prompts, group_size=group, steps=range(steps))
    assert records[0]["generators_updated"] == 20 and records[-1]["generators_updated"] == 18
    assert 0 < sum(m["accuracy"] for m in records) / steps < 1  # real rewards from sim.accuracy 0.5


# ------------------------------------------------------------------------------------ what the scale table fixed

def test_load_book_deals_as_the_scan_over_every_generator_did():
    from actors.sampler.load_book import LoadBook
    book, ref, last, deals = LoadBook(), {}, {}, 0
    rng = random.Random(1)
    for _ in range(5000):
        op = rng.random()
        if op < 0.5 and ref:
            want = min(ref, key=lambda g: (ref[g], last.get(g, -1), g))  # the sampler's former rule
            deals += 1
            last[want] = deals
            ref[want] += 1
            assert book.deal() == want
        elif op < 0.8 and ref:
            g = rng.choice(sorted(ref))
            ref[g] = book[g] = max(0, ref[g] - 1)
        elif op < 0.9 and ref:
            g = rng.choice(sorted(ref))
            del ref[g], book[g]
        elif (g := rng.choice("abcdefgh")) not in ref:
            ref[g] = book[g] = rng.randint(0, 3)
    assert dict(book) == ref and len(book._heap) <= 4 * len(book) + 64


def test_registry_lists_a_role_from_its_index_through_rejoins_and_departures():
    from bus.registry import ActorInfo, Registry
    reg = Registry()
    for i in range(3):
        reg.register(b"g%d" % i, ActorInfo(f"g{i}", "generator", "h", i), f"s{i}", 3.0, [], 0.0)
    reg.register(b"p", ActorInfo("p", "packer", "h", 9), "sp", 3.0, [], 0.0)
    reg.register(b"g1-new", ActorInfo("g1", "generator", "h", 1), "s1", 3.0, [], 0.0)  # reconnected
    reg.remove(reg.by_name["g0"])
    assert [a.name for a in reg.actors("generator")] == ["g2", "g1"]
    assert [a.name for a in reg.actors("packer")] == ["p"] and reg.actors("verifier") == []
    reg.expire(10.0)
    assert reg.actors("generator") == [] and reg.by_role == {}
