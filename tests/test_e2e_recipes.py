"""The most involved preset as a whole job: `ppo.recipe: dapo` (dynamic sampling, clip-higher, group advantages,
overlong punishment, token-level TIS against the generator's logprobs) through all six actors.

A reward function marks the first batch's problems always solved: its groups have no variance, so dynamic
sampling sets them apart and the sampler deals other prompts until the batch is full. Every prompt dealt is
either trained once (all G samples) or dropped and counted."""
from __future__ import annotations

import json

import pytest

from launcher.job.metrics import read_metrics
from policies.data.dataset import load_problems
from actors.sampler.sampler import refill_index
from tests.launch_util import dataset, expected_qids, launch, tiny_overrides

G, B, SEED = 4, 2, 1

REWARD_FN = '''
import zlib
SOLVED = set({solved!r})

def reward(prompt, response, reference, extra):
    if prompt in SOLVED:
        return 1.0                                           # every sample right: a group with no variance
    return 1.0 if zlib.crc32(response.encode()) % 2 else -1.0  # the rest: right or wrong by the response
'''


def test_dapo_refills_zero_variance_groups_and_accounts_for_every_prompt(tmp_path):
    train = dataset(tmp_path)
    problems = load_problems(train)
    by_id = {p.id: p for p in problems}
    first = expected_qids(train, batch_prompts=B, seed=SEED, step=0)
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD_FN.format(solved=[by_id[q].prompt for q in first]))
    run_dir = tmp_path / "run"
    overrides = {"train.steps": 2, "rollout.group_size": G, "ppo.recipe": "dapo", "ppo.recompute_logprobs": "true",
                 "reward.fns": json.dumps([{"fn": f"{fn}:reward"}]), "reward.overlong": "{buffer: 4, penalty: 1.0}"}
    r = launch(["--quiet", "--config", "configs/tiny.yaml", *tiny_overrides(run_dir, train, **overrides)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "recipe: dapo (loss=ppo, eps_clip_low=0.2, eps_clip_high=0.28" in r.stdout
    assert "mismatch=tis" in r.stdout and "dynamic_sampling=true" in r.stdout

    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1]
    for m in records:
        step = m["step"]
        trained, dropped = set(m["qids"]), set(m["dropped_qids"])
        assert not trained & dropped and len(trained) == B, m  # the batch is full
        assert all(m["qids"].count(q) == G for q in trained)  # each trained once, with all its samples
        assert m["groups_dropped"] == len(dropped) and m["groups"] == len(trained) + len(dropped)
        # what was dealt: the step's batch of the data order, and one refill for each group set apart
        refills = {f"{problems[refill_index(len(problems), SEED, step, k)].id}#r{k}" for k in range(len(dropped))}
        assert trained | dropped == set(expected_qids(train, batch_prompts=B, seed=SEED, step=step)) | refills
        assert 0 < m["behav_imp_weight"] <= 2.0 and "behav_logprob_gap" in m  # TIS on recomputed logprobs
    assert set(first) <= set(records[0]["dropped_qids"])  # the all-solved batch was refilled
