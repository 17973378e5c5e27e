"""Rollout workers' pure parts and their workflow processes, without a bus: a workflow found and checked at
launch (errors name rollout.workflow), trajectories turned into the packer's sequences (loss mask exactly the
sampled tokens, one reward per trajectory on every segment, failed samples left out and counted), the
verifier scoring only what workflows left None, and the process pool failing one sample, never the others,
for a workflow that raises, hangs, blocks its loop, dies or returns no number."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from actors.packer import ScoredGroup, pack_step
from actors.rollout.pool import WorkflowPool
from actors.rollout.trajectory import Trajectory, check_segments, group_batch, group_report
from actors.rollout.workflow import WorkflowError, load_workflow
from launcher.config.schema import ExperimentConfig, check_workflow
from policies.settings import ConfigError, from_dict

WORKFLOWS = '''
import asyncio, os, time
started = 0
everyone = asyncio.Event()

async def _together(problem):
    global started
    started += 1
    if started >= problem["n"]:
        everyone.set()
    await asyncio.wait_for(everyone.wait(), 20)
    return float(problem["i"])

async def mixed(problem, client):
    kind = problem["kind"]
    if kind == "together":
        return await _together(problem)
    if kind == "raise":
        raise KeyError("no such tool")
    if kind == "hang":
        await asyncio.sleep(3600)
    if kind == "block":
        time.sleep(3600)
    if kind == "die":
        os._exit(3)
    if kind == "nan":
        return float("nan")
    if kind == "none":
        return None
    return 1.5

def not_async(problem, client):
    return 1.0

async def one_arg(problem):
    return 1.0
'''


@pytest.fixture
def wf(tmp_path):
    path = tmp_path / "wf.py"
    path.write_text(WORKFLOWS)
    return str(path)


def test_a_workflow_is_checked_at_launch_and_errors_name_the_key(wf, tmp_path):
    assert load_workflow(f"{wf}:mixed").__name__ == "mixed"
    assert load_workflow("actors.rollout.builtin:boba").__name__ == "boba"
    for spec, why in [(f"{wf}:not_async", "must be an async def"), (f"{wf}:one_arg", "must take (problem, client)"),
                      (f"{wf}:absent", "has no attribute 'absent'"), ("no_such_pkg.mod:fn", "cannot import"),
                      (f"{tmp_path}/nope.py:fn", "no such file")]:
        with pytest.raises(WorkflowError, match=why.replace("(", r"\(").replace(")", r"\)")):
            load_workflow(spec)
        cfg = from_dict(ExperimentConfig, {"rollout": {"workflow": spec}})
        with pytest.raises(ConfigError, match=r"^rollout\.workflow: "):
            check_workflow(cfg)
    with pytest.raises(ConfigError, match=r"^rollout\.workflow: expected .*package.module:function.*got .no_colon."):
        from_dict(ExperimentConfig, {"rollout": {"workflow": "no_colon"}})
    with pytest.raises(ConfigError, match=r"^rollout\.workflow_timeout: expected less than rollout\.request_timeout"):
        from_dict(ExperimentConfig, {"rollout": {"workflow": f"{wf}:mixed", "workflow_timeout": 900}})
    cfg = from_dict(ExperimentConfig, {})
    assert cfg.rollout.workflow is None  # the single-turn path stays the default
    from launcher.job.plan import job_roles
    assert "rollout" not in job_roles(cfg)
    assert "rollout" in job_roles(from_dict(ExperimentConfig, {"rollout": {"workflow": f"{wf}:mixed"}}))


def seg(prompt: list[int], turns: list[tuple[list[int], list[int]]], version: int = 0) -> dict:
    """A segment: prompt tokens, then (sampled, tool output) per turn."""
    ids, mask, lps, vers = list(prompt), [False] * len(prompt), [0.0] * len(prompt), [-1] * len(prompt)
    for sampled, tool in turns:
        ids += sampled + tool
        mask += [True] * len(sampled) + [False] * len(tool)
        lps += [-0.5] * len(sampled) + [0.0] * len(tool)
        vers += [version] * len(sampled) + [-1] * len(tool)
    return {"input_ids": ids, "loss_mask": mask, "logprobs": lps, "versions": vers}


def test_trajectories_become_sequences_with_exactly_the_sampled_tokens_in_the_loss():
    two_turns = seg([1, 2, 3], [([10, 11], [50, 51, 52]), ([12], [])])
    rewritten = [seg([1, 2], [([20], [])]), seg([7, 8], [([21, 22], [])], version=1)]  # history cut: 2 segments
    trajs = [Trajectory([two_turns], 2.0, turns=2, last_text="a"),
             Trajectory(rewritten, None, turns=2, last_text="b", finish="length"),
             Trajectory([seg([1], [([9], [])])], None, error="Traceback ... KeyError", turns=1)]
    batch = group_batch(trajs)
    assert batch.num_seqs == 3  # the failed sample is left out
    got = batch.sequences()
    assert got[0]["input_ids"].tolist() == [1, 2, 3, 10, 11, 50, 51, 52, 12]
    assert got[0]["loss_mask"].tolist() == [False] * 3 + [True] * 2 + [False] * 3 + [True]
    assert got[2]["versions"].tolist() == [-1, -1, 1, 1]
    report = group_report(trajs, version=0)
    assert report["rewards"] == [2.0, None, None] and report["texts"] == ["a", "b", "b"]
    st = report["stats"]
    assert st["response_tokens"] == [3, 1, 2] and st["truncated"] == [False, True, True]
    assert (st["trajectories"], st["workflow_errors"], st["turns"], st["segments"]) == (2, 1, [2, 2], 3)
    assert (st["version_min"], st["version_max"]) == (0, 1)
    assert group_batch([trajs[2]]) is None
    with pytest.raises(ValueError, match=r"segments\[0\]: 3 input_ids but loss_mask \(2\)"):
        check_segments([{"input_ids": [1, 2, 3], "loss_mask": [0, 1], "logprobs": [0] * 3, "versions": [0] * 3}])
    with pytest.raises(ValueError, match="1 came, the generator closed the session with 2"):
        check_segments([two_turns], 2)   # the tensor channel delivered fewer sequences than the bus said


def test_the_packer_gives_every_segment_its_trajectory_reward_and_takes_an_empty_group():
    trajs = [Trajectory([seg([1], [([2], [3])])], 1.0, turns=1), Trajectory([seg([1], [([4], [])])], -1.0, turns=1)]
    rep = group_report(trajs, 0)
    full = ScoredGroup("q1", group_batch(trajs), rep["rewards"], [True, False], rep["stats"])
    empty_rep = group_report([Trajectory(error="boom")], 0)
    empty = ScoredGroup("q2", None, [], [], empty_rep["stats"])
    packed, stats = pack_step(0, [full, empty], drop_uniform=True)
    assert packed.num_seqs == 2 and packed.seqs["rewards"].tolist() == [1.0, -1.0]
    assert packed.meta["qids"] == ["q1", "q1"] and packed.seqs["group_ids"].tolist() == [0, 0]
    assert stats["groups"] == 2 and stats["groups_dropped"] == 0 and stats["dropped_qids"] == []
    assert stats["trajectories"] == 2 and stats["workflow_errors"] == 1 and stats["turns_mean"] == 1.0


async def test_the_verifier_scores_only_what_the_workflows_left_none():
    from actors.verifier import Verifier

    class FakePool:
        async def score(self, texts, answers):
            return ["42" in t for t in texts]

        def close(self):
            pass

    v = Verifier.__new__(Verifier)
    from policies.verify.reward import RewardConfig
    v.reward_cfg, v.pool, v.deliver_timeout, v._active, v.name = RewardConfig(), FakePool(), 1.0, set(), "verifier-0"
    sent = []

    async def deliver(dst, type_, body, within):
        sent.append((dst, type_, body))
    v.deliver = deliver
    body = {"step": 0, "qid": "q", "texts": ["42", "7", "x"], "rewards": [None, None, 0.25], "answers": ["42"],
            "stats": {"response_tokens": [1, 1, 1]}, "rollout_ref": None, "generator": "g", "epoch": None}
    await v._score((0, "q", None), body)
    (dst, type_, scored), = sent
    assert type_ == "scored" and scored["rewards"] == [5.0, -5.0, 0.25] and scored["correct"] == [True, False, True]


async def test_a_workflow_failing_fails_its_sample_only_and_many_run_at_once(wf):
    pool = WorkflowPool(f"{wf}:mixed", workers=1, timeout=2.0, grace=2.0)
    await pool.start()
    try:
        # eight samples that finish only when all eight run at once on the one process's loop
        outs = await asyncio.gather(*(pool.run({"kind": "together", "n": 8, "i": i}, "u", "k") for i in range(8)))
        assert [o.reward for o in outs] == [float(i) for i in range(8)], outs
        kinds = ["ok", "raise", "hang", "nan", "none", "ok"]
        outs = await asyncio.gather(*(pool.run({"kind": k}, "http://127.0.0.1:9/v1", "k") for k in kinds))
        by = dict(zip(kinds, outs))
        assert by["ok"].reward == 1.5 and by["ok"].error is None
        assert by["none"].reward is None and by["none"].error is None
        assert "KeyError: 'no such tool'" in by["raise"].error and "Traceback" in by["raise"].error
        assert "rollout.workflow_timeout=2s" in by["hang"].error
        assert "expected a finite number or None" in by["nan"].error
        assert pool.killed == 0
        # a workflow that blocks its loop: its process is killed, the samples on it fail, a new one serves
        outs = await asyncio.gather(pool.run({"kind": "block"}, "u", "k"), pool.run({"kind": "hang"}, "u", "k"))
        assert all("blocked its process" in o.error for o in outs) and pool.killed == 1
        died = await pool.run({"kind": "die"}, "u", "k")
        assert "died (exit code 3" in died.error and pool.killed == 2
        assert (await pool.run({"kind": "ok"}, "u", "k")).reward == 1.5
    finally:
        pool.close()


def test_rollout_workers_are_placed_only_with_a_workflow_and_their_key_opens_sessions_only(wf, tmp_path):
    from bus import trust
    from launcher.job.plan import process_specs
    from launcher.job.start import Start
    plain = from_dict(ExperimentConfig, {"model": {"device": "cpu"}})
    agentic = from_dict(ExperimentConfig, {"model": {"device": "cpu"}, "rollout": {"workflow": f"{wf}:mixed"},
                                           "actors": {"rollout": {"count": 2}}})
    start = Start(0, "/models/x")
    assert not [s for s in process_specs(plain, tmp_path / "c.yaml", "tcp://127.0.0.1:1", start, None)
                if s.role == "rollout"]
    specs = [s for s in process_specs(agentic, tmp_path / "c.yaml", "tcp://127.0.0.1:1", start, None)
             if s.role == "rollout"]
    assert [s.name for s in specs] == ["rollout-0", "rollout-1"]
    assert specs[0].argv[specs[0].argv.index("actor"):][:4] == ["actor", "rollout", "--name", "rollout-0"]
    assert trust.KEY_ROLES["rollout"] == ("rollout", trust.TOOL)
    may = {t for t, roles in trust.SENDERS.items() if "rollout" in roles}
    assert may == {"open_session", "close_session", "score", "generated", "rejected"}


async def test_the_builtin_boba_workflow_asks_once_on_the_single_turn_chat_and_leaves_the_score_to_the_verifier():
    from actors.rollout.actor import RolloutSettings, problem_for
    from actors.rollout.builtin import boba
    calls = []

    class Completions:
        async def create(self, **kw):
            calls.append(kw)

    class Client:
        chat = type("Chat", (), {"completions": Completions()})()

    s = RolloutSettings(max_turns=1, max_trajectory_tokens=8, workflow_timeout=5.0, directive="Box it.",
                        system_prompt="Be brief.")
    problem = problem_for({"qid": "q#1", "answers": ["4"], "problem": {"prompt": "2+2?", "extra": {"k": 1}}}, s)
    assert problem == {"id": "q#1", "prompt": "2+2?", "answers": ["4"], "extra": {"k": 1},
                       "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? Box it."}]}
    assert await boba(problem, Client()) is None
    assert [c["messages"] for c in calls] == [problem["messages"]]


def test_each_kind_of_workflow_failure_is_logged_once_and_every_one_counted(caplog):
    from actors.rollout.actor import RolloutWorker
    w = RolloutWorker.__new__(RolloutWorker)
    w.name, w.workflow_errors, w._reported = "rollout-0", 0, set()
    tb = "Traceback (most recent call last):\n  File \"a.py\", line 1\n{}"
    with caplog.at_level("WARNING", logger="actors.rollout"):
        for err in ["KeyError: 'x'", "KeyError: 'x'", "ValueError: y", "KeyError: 'x'"]:
            w._report("0:q", tb.format(err))
    assert w.workflow_errors == 4
    assert [r.getMessage().count("Traceback") for r in caplog.records] == [1, 1]
    assert "KeyError: 'x'" in caplog.records[0].getMessage() and "ValueError: y" in caplog.records[1].getMessage()


def test_group_advantages_count_trajectories_not_segments():
    from policies.train.advantages import group_advantages
    # trajectory A: two segments (a rewritten history), reward 1; trajectory B: one segment, reward -1
    trajs = [Trajectory([seg([1], [([2], [])]), seg([3], [([4], [])])], 1.0, turns=2),
             Trajectory([seg([1], [([5], [])])], -1.0, turns=1)]
    rep = group_report(trajs, 0)
    group = ScoredGroup("q", group_batch(trajs), rep["rewards"], [True, True, False], rep["stats"])
    other = ScoredGroup("r", group_batch(trajs[1:]), [-1.0], [False], group_report(trajs[1:], 0)["stats"])
    packed, _ = pack_step(0, [group, other], drop_uniform=False)
    assert packed.seqs["seq_weights"].tolist() == [0.5, 0.5, 1.0, 1.0]
    mask, cu = packed.loss_mask, packed.cu_seqlens
    raw = torch.where(mask, torch.repeat_interleave(packed.seqs["rewards"], packed.seqlens), 0.0)
    grpo = group_advantages(raw, mask, cu, packed.seqs["group_ids"], "grpo", seq_weights=packed.seqs["seq_weights"])
    # over trajectories: mean 0, std 1 (over segments it would be mean 1/3, and A would count twice)
    assert grpo[mask].tolist() == pytest.approx([1.0, 1.0, -1.0, 0.0], abs=1e-4)
    rloo = group_advantages(raw, mask, cu, packed.seqs["group_ids"], "rloo", seq_weights=packed.seqs["seq_weights"])
    assert rloo[mask].tolist() == pytest.approx([2.0, 2.0, -2.0, 0.0])  # n = 2 trajectories: R - mean, x 2/1
    single, _ = pack_step(0, [other], drop_uniform=False)
    assert "seq_weights" not in single.seqs  # one sequence per sample: batches as before
