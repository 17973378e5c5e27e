"""The learner's exactly-once record lives in RUN_DIR/trained.jsonl; its memory and replies stay bounded."""
from __future__ import annotations

import msgpack
import pytest
import torch

import actors.learner.learner as learner_mod
from actors.learner.learner import Learner, LearnerSettings
from actors.learner.trained_log import TrainedLog, TrainedLogError, read_trained
from policies.train.ppo import PPOConfig
from tensors.channels import open_channel
from tensors.packed import PackedBatch

SEQS = 64  # sequences a step, each with a 24-character query id (the real runs: 8,192)
WINDOW = 8


async def _published(version: int) -> dict:  # the broadcaster's answer to PUBLISH_WEIGHTS
    return {"updated": 1, "failed": 0}


def _batch(step: int) -> PackedBatch:
    seqs = [{"input_ids": torch.arange(4), "loss_mask": torch.tensor([False, True, True, True]),
             "logprobs": torch.zeros(4), "versions": torch.zeros(4, dtype=torch.int32),
             "rewards": 1.0, "group_ids": i} for i in range(SEQS)]
    return PackedBatch.from_sequences(seqs, meta={"qids": [f"step{step:06d}-query{i:08d}" for i in range(SEQS)]})


def _learner(run_dir, start_step: int = 0, total: int = 10_000) -> Learner:
    settings = LearnerSettings(run_dir=run_dir, total_steps=total, start_step=start_step, recompute=False,
                               checkpoint_every=0, keep_checkpoints=2, recent_steps=WINDOW)
    lrn = Learner("tcp://127.0.0.1:1", model=None, tokenizer=None, optimizer=None, ppo=PPOConfig(), settings=settings)
    lrn.publish_weights = _published
    published = []

    async def publish(topic, body):
        published.append(body)

    lrn.bus.publish = publish
    lrn.published = published
    return lrn


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(learner_mod, "train_step", lambda *a, **k: {"loss": 0.5})


async def _train(lrn: Learner, steps: range) -> None:
    async with open_channel("local") as ch:
        for step in steps:
            d = await ch.send(_batch(step), timeout=10)
            await lrn._train_one({"step": step, "batch_ref": d, "stats": {}})


def _size(reply: dict) -> int:
    return len(msgpack.packb(reply))


async def test_many_steps_keep_memory_and_replies_bounded_and_the_file_complete(tmp_path, no_training):
    lrn = _learner(tmp_path)
    await _train(lrn, range(3 * WINDOW))
    state_small, metrics_small = await lrn.on_state({}, "t"), await lrn.on_metrics({"since": 0}, "t")
    await _train(lrn, range(3 * WINDOW, 40 * WINDOW))
    state, metrics = await lrn.on_state({}, "t"), await lrn.on_metrics({"since": 0}, "t")

    assert len(lrn.trained.recent) == WINDOW, "memory holds the recent steps only"
    assert sorted(int(s) for s in state["trained_qids"]) == list(range(39 * WINDOW, 40 * WINDOW))
    assert _size(state) <= _size(state_small) * 1.01, "the learner-state reply does not grow with the steps"
    assert _size(metrics) <= _size(metrics_small) * 1.01
    assert state["trained_steps"] == [0, 40 * WINDOW] and state["trained_file"] == str(tmp_path / "trained.jsonl")

    records = read_trained(tmp_path)
    assert [r["step"] for r in records] == list(range(40 * WINDOW)), "every step, exactly once, in order"
    assert all(r["qids"] == _batch(r["step"]).meta["qids"] for r in records)
    assert [r["step"] for r in lrn.published] == list(range(40 * WINDOW))
    assert lrn.published[-1]["generators_updated"] == 1

    # an old step's metrics are still served (from the file), a few at a time
    old = await lrn.on_metrics({"since": 3}, "t")
    assert [r["step"] for r in old["records"]] == [3, 4, 5, 6]


async def test_a_step_trained_twice_is_detected_after_the_memory_window(tmp_path, no_training):
    lrn = _learner(tmp_path)
    await _train(lrn, range(3 * WINDOW))
    assert lrn.trained.recent[0]["step"] > 0, "step 0 left memory"
    await lrn.on_train({"step": 0, "batch_ref": None, "stats": {}}, "packer")  # a late second copy: ignored
    assert 0 not in lrn.pending
    with pytest.raises(TrainedLogError, match=r"trained.jsonl: step 0 already recorded \(the record holds steps 0\.\.23\)"):
        lrn.trained.record({"step": 0, "qids": []})
    assert [r["step"] for r in read_trained(tmp_path)] == list(range(3 * WINDOW))


async def test_resume_drops_the_rolled_back_steps_and_records_them_again(tmp_path, no_training):
    await _train(_learner(tmp_path), range(10))
    with open(tmp_path / "trained.jsonl", "a") as f:
        f.write('{"step":10,"qi')  # a crash mid-append
    resumed = _learner(tmp_path, start_step=6)  # the checkpoint of step 6: steps 6..9 are trained again
    assert [r["step"] for r in read_trained(tmp_path)] == list(range(6))
    await _train(resumed, range(6, 12))
    assert [r["step"] for r in read_trained(tmp_path)] == list(range(12))
    state = await resumed.on_state({"qids": False}, "t")
    assert state["trained_steps"] == [0, 12] and "trained_qids" not in state


def test_a_skipped_step_is_named(tmp_path):
    log = TrainedLog(tmp_path, start_step=0)
    log.record({"step": 0, "qids": ["a"]})
    with pytest.raises(TrainedLogError, match="step 2 skips steps 1..1"):
        log.record({"step": 2, "qids": ["b"]})


async def test_a_step_is_served_only_once_its_weight_sync_is_done(tmp_path, no_training):
    """A launcher that fetches while the learner broadcasts must not get a record without the sync
    fields in place of the publication still to come (it would ignore the publication as a copy)."""
    import asyncio

    lrn = _learner(tmp_path)
    await _train(lrn, range(1))
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow_broadcaster(version):
        entered.set()
        await release.wait()
        return {"updated": 1, "failed": 0}

    lrn.publish_weights = slow_broadcaster
    training = asyncio.create_task(_train(lrn, range(1, 2)))
    await asyncio.wait_for(entered.wait(), 10)
    assert [r["step"] for r in read_trained(tmp_path)] == [0, 1], "on disk before the sync"
    assert (await lrn.on_metrics({"since": 1}, "t"))["records"] == []
    release.set()
    await asyncio.wait_for(training, 10)
    [rec] = (await lrn.on_metrics({"since": 1}, "t"))["records"]
    assert rec["step"] == 1 and rec["generators_updated"] == 1
