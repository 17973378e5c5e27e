"""An agent written only against the `openai` package trains through `rollout.workflow`: one whole job on the
tiny model, every actor built by its launcher builder (launcher.job.roles) on one real bus, in this process
so the test sees the batches the learner trains on.

Proof of issue #30's contract: trajectories of two turns reach the learner as one sequence each, their loss
mask covers exactly the tokens the policy sampled (the agent's two replies, token for token; the prompt,
the template's turn markers and the agent's own user turn are masked), the recorded behaviour logprobs
equal the learner's recompute in fp32 (max abs difference below 1e-4: the same torch code, same weights,
max_staleness 0), every prompt is trained once with all its samples, the workflows' own rewards reach the
packer (the verifier scores the rest), and a workflow that raises fails its samples only: the job goes on,
the failures counted in the step's metrics."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch

from bus.broker import Broker
from launcher.config.schema import ExperimentConfig, check_workflow
from launcher.config.yaml_io import load_config
from launcher.job.plan import bus_kwargs
from launcher.job.roles import build
from launcher.job.start import Start, base_model_path
from policies.data.dataset import load_problems
from policies.data.prompts import build_prompt
from policies.model.loading import load_tokenizer
from policies.train.ppo import recompute_logprobs
from tests.launch_util import ROOT, dataset, expected_qids

G, B, STEPS, SEED = 2, 2, 2, 1
AGENT = str(ROOT / "tests" / "agents" / "two_turn.py") + ":agent"


def spans(mask: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


async def test_an_openai_agent_trains_through_rollout_workflow(tmp_path, monkeypatch):
    train = dataset(tmp_path)
    fail = expected_qids(train, batch_prompts=B, seed=SEED, step=0)[0]  # this problem's tool always breaks
    log = tmp_path / "agent.jsonl"
    monkeypatch.setenv("AGENT_LOG", str(log))
    monkeypatch.setenv("AGENT_FAIL_IDS", fail)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.train={train}", "data.test=null", f"seed={SEED}",
        f"train.steps={STEPS}", "train.checkpoint_every=0", f"rollout.batch_prompts={B}", f"rollout.group_size={G}",
        "rollout.max_new_tokens=6", f"rollout.workflow={AGENT}", "rollout.max_turns=2",
        "rollout.max_trajectory_tokens=12", "rollout.workflow_timeout=60", "rollout.request_timeout=120",
        "actors.rollout.workers=1", "bus.heartbeat_interval=1.0"])
    check_workflow(cfg)
    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=1.0)
    await broker.start()
    start = Start(0, base_model_path(cfg))
    actors, seen = [], []
    try:
        for role, name in [("learner", "learner"), ("packer", "packer"), ("verifier", "verifier-0"),
                           ("generator", "generator-0"), ("rollout", "rollout-0"), ("sampler", "sampler")]:
            actors += build(role, name, cfg, broker.address, start, bus_kwargs(cfg, role))
        learner = actors[0]
        train_batch = learner.train_batch

        def capture(batch, step):  # before the step trains: the weights the generator sampled with
            with torch.no_grad():
                seen.append((step, batch, recompute_logprobs(learner.model, batch, cfg.ppo, loss_tokens_only=True)))
            return train_batch(batch, step)
        learner.train_batch = capture
        for a in actors:
            await a.start()
        deadline = asyncio.get_running_loop().time() + 150
        while len(records := learner.trained.since(0, 10)) < STEPS:  # each step's record, completed
            assert asyncio.get_running_loop().time() < deadline, f"only {learner.step} steps in 150 s"
            await asyncio.sleep(0.2)
    finally:
        for a in reversed(actors):
            await a.stop()
        await broker.stop()

    tok = load_tokenizer(start.model_path)
    by_id = {p.id: p for p in load_problems(train)}
    checked = []
    logged: dict[str, list[dict]] = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        logged.setdefault(rec["id"], []).append(rec)
    assert fail not in logged  # its agent raised before logging: every sample of it failed
    assert [s for s, _, _ in seen] == list(range(STEPS)) and [r["step"] for r in records] == list(range(STEPS))
    for (step, batch, prox), rec in zip(seen, records):
        qids = batch.meta["qids"]
        expect = set(expected_qids(train, batch_prompts=B, seed=SEED, step=step)) - {fail}
        assert set(qids) == expect and all(qids.count(q) == G for q in expect), (step, qids)  # once, all samples
        assert rec["trajectories"] == G * len(expect) and rec["turns_max"] == 2 and rec["turns_mean"] == 2.0
        assert rec["workflow_errors"] == (G if step == 0 else 0), rec  # the broken tool's samples, counted
        mask = batch.loss_mask.bool()
        assert torch.equal(batch.versions[mask], torch.full_like(batch.versions[mask], step))
        assert (batch.versions[~mask] == -1).all() and (batch.logprobs[~mask] == 0).all()
        gap = (prox[mask] - batch.logprobs[mask]).abs().max().item()
        assert gap < 1e-4, f"step {step}: recorded logprobs differ from the learner's fp32 recompute by {gap}"
        unmatched = {q: list(logged[q]) for q in expect}
        for i, seq in enumerate(batch.sequences()):
            ids, m = seq["input_ids"].tolist(), seq["loss_mask"].tolist()
            turns = spans(m)
            assert len(turns) == 2, f"{qids[i]}: {len(turns)} sampled spans, expected the agent's 2 turns"
            texts = [tok.decode(ids[a:b], skip_special_tokens=True) for a, b in turns]
            # the sequence is the trajectory of one sample of this qid, exactly: its replies, token for token
            rec_i = next((r for r in unmatched[qids[i]] if r["texts"] == texts and
                          r["usage"] == [b - a for a, b in turns]), None)
            assert rec_i is not None, (qids[i], texts, [b - a for a, b in turns], unmatched[qids[i]])
            unmatched[qids[i]].remove(rec_i)
            between = tok.decode(ids[turns[0][1]:turns[1][0]])
            assert "Check your answer" in between
            # no re-tokenisation drift: the first turn's prompt is the single-turn recipe's, token for token
            assert ids[:turns[0][0]] == build_prompt(tok, by_id[qids[i]].prompt, cfg.data.prompt_directive)
            want = rec_i["reward"]
            if want is not None:  # the agent's own reward, on every sequence of its trajectory
                assert batch.seqs["rewards"][i].item() == want
            else:  # the verifier's: the boxed check of its last answer
                assert batch.seqs["rewards"][i].item() in (cfg.reward.correct, cfg.reward.wrong)
        assert not any(unmatched.values())
        checked.append(batch.num_seqs)
    assert checked == [G * (B - 1), G * B]
