"""`eval --workflow`: pass@1 of a multi-turn agent, each sample through its own session as in training.

The agent (tests/agents/two_turn.py, written against `openai` alone) logs what the endpoint gave it; the
evaluation must count exactly what that log implies: a sample with the agent's own reward is correct when
the reward is > 0, one without is the verifier's judgement of its last answer, one whose agent raised is
wrong and counted in `workflow_errors`; the turns are the ones the agent took.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from launcher.__main__ import main
from policies.data.dataset import load_problems
from policies.verify.math_equal import is_correct
from tests.launch_util import ROOT

AGENT = str(ROOT / "tests" / "agents" / "two_turn.py") + ":agent"
K = 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from policies.model.loading import load_tokenizer, save_checkpoint, smollm2_dir, tiny_model
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(tiny_model(seed=0), load_tokenizer(smollm2_dir()), out)
    return out


def test_eval_with_a_workflow_counts_what_the_agent_and_the_verifier_said(tmp_path, tiny_dir, monkeypatch, capsys):
    data = tmp_path / "test.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r["id"] for r in rows]
    assert {zlib.crc32(i.encode()) % 2 for i in ids} == {0, 1}   # both kinds of scoring are exercised
    log = tmp_path / "agent.jsonl"
    monkeypatch.setenv("AGENT_LOG", str(log))
    monkeypatch.setenv("AGENT_FAIL_IDS", "q4")
    res = tmp_path / "eval.json"
    assert main(["eval", "--data", str(data), "--model", str(tiny_dir), "--device", "cpu", "-k", str(K),
                 "--max-new-tokens", "6", "--workflow", AGENT, "--max-turns", "4", "--workflow-timeout", "60",
                 "--out", str(res)]) == 0
    r = json.loads(res.read_text())

    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(x["id"] for x in logged) == sorted(i for i in ids if i != "q4" for _ in range(K))
    assert all(len(x["texts"]) == 2 for x in logged)
    answers = {p.id: p.answers for p in load_problems(data)}
    want = {i: 0 for i in ids}
    for x in logged:
        ok = x["reward"] > 0 if x["reward"] is not None else is_correct(x["texts"][-1], answers[x["id"]][0])
        want[x["id"]] += ok
    assert {p["id"]: p["correct"] for p in r["per_problem"]} == want
    assert any(want.values())   # a reward > 0 counted (the agent's rewards are -1, 0 or 1 by text length)
    assert r["pass@1"] == pytest.approx(sum(want.values()) / (K * len(ids)))
    assert r["workflow_errors"] == K                        # q4's samples: wrong, counted, the rest went on
    assert r["turns"] == pytest.approx((2 * K * 5 + 1 * K) / (K * 6))
    assert "turns failed" in capsys.readouterr().out


def test_eval_names_a_workflow_that_cannot_be_used(tmp_path, tiny_dir, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n")
    for spec, says in [(str(ROOT / "tests" / "agents" / "two_turn.py") + ":nope", "nope"),
                       ("json:dumps", "must be an async def")]:
        assert main(["eval", "--data", str(data), "--model", str(tiny_dir), "--workflow", spec]) == 2
        err = capsys.readouterr().err
        assert "--workflow" in err and says in err
