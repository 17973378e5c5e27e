"""`python -m launcher data`: reasoning-gym's problems in the project's layout, a held-out split that shares
no generator or template with what is trained on, and reasoning-gym's scorer as a reward function."""
from __future__ import annotations

import json
import math

import pytest

from launcher.__main__ import main
from launcher.gymdata import HELDOUT_GSM_TEMPLATES, NotWorkable, arithmetic_steps
from policies.data.dataset import load_problems, load_sft_pairs
from policies.verify.gym_score import gym_score, reasoning_gym
from policies.verify.math_equal import is_correct

SIZES = ["--train", "300", "--test", "60", "--sft", "100", "--heldout", "40"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gym")
    assert main(["data", str(d / "a"), *SIZES, "--seed", "3"]) == 0
    assert main(["data", str(d / "b"), *SIZES, "--seed", "3"]) == 0
    assert main(["data", str(d / "c"), *SIZES, "--seed", "4"]) == 0
    return d


def test_heldout_shares_no_generator_or_template_with_training(data):
    a = data / "a"
    trained = {s: _rows(a / f"{s}.jsonl") for s in ("train", "sft", "test")}
    held = _rows(a / "heldout.jsonl")
    assert len(held) == 40 and len(trained["train"]) == 300 and len(trained["sft"]) == 100
    seen = {(r["source"], r["template"]) for rows in trained.values() for r in rows}
    held_keys = {(r["source"], r["template"]) for r in held}
    assert not seen & held_keys
    assert {s for s, _ in seen} == {"chain_sum", "basic_arithmetic", "leg_counting", "gsm_symbolic"}
    assert {t for s, t in seen if s == "gsm_symbolic"}.isdisjoint(HELDOUT_GSM_TEMPLATES)
    # the held-out column: the project's six templates and the held-out gsm_symbolic templates, half each
    assert {t for s, t in held_keys if s == "mathdata"} == {"add", "subtract", "multiply", "divide", "add_subtract",
                                                            "multiply_add"}
    assert {t for s, t in held_keys if s == "gsm_symbolic"} <= set(HELDOUT_GSM_TEMPLATES)
    assert [r["source"] for r in held[:4]] == ["mathdata", "gsm_symbolic"] * 2  # `eval --limit N` gets both
    assert _rows(a / "heldout-templates.jsonl") == [r for r in held if r["source"] == "mathdata"]
    assert _rows(a / "heldout-gsm.jsonl") == [r for r in held if r["source"] == "gsm_symbolic"]
    assert sum(r["source"] == "gsm_symbolic" for r in held) == 20
    prompts = [r["prompt"] for rows in (*trained.values(), held) for r in rows]
    assert len(set(prompts)) == len(prompts)  # no problem in two splits
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["heldout"]["gsm_symbolic_templates"] == list(HELDOUT_GSM_TEMPLATES)


def test_same_seed_same_files_other_seed_other_problems(data):
    for name in ("train.jsonl", "test.jsonl", "sft.jsonl", "heldout.jsonl", "heldout-templates.jsonl",
                 "heldout-gsm.jsonl"):
        assert (data / "a" / name).read_bytes() == (data / "b" / name).read_bytes(), name
        assert (data / "a" / name).read_bytes() != (data / "c" / name).read_bytes(), name


def test_the_project_reads_the_files_and_verifies_their_answers(data):
    a = data / "a"
    for split in ("train", "test", "heldout"):
        problems = load_problems(a / f"{split}.jsonl")
        assert problems[0].id == (f"{split}-0" if split != "heldout" else "heldout-mathdata-0")
        for p in problems:
            assert is_correct(f"So the result is \\boxed{{{p.answers[0]}}}.", p.answers), (split, p)
        wrong = problems[1]
        assert not is_correct(f"\\boxed{{{int(float(wrong.answers[0])) + 1}}}", wrong.answers)
    pairs, rows = load_sft_pairs(a / "sft.jsonl"), _rows(a / "sft.jsonl")
    assert [p.prompt for p in pairs] == [r["prompt"] for r in rows]
    for pair, row in zip(pairs, rows):  # worked step by step, ending in the boxed correct answer
        assert pair.response.count("\n") >= 1 and is_correct(pair.response, row["answer"]), pair.response
    gsm = next(p.response for p, r in zip(pairs, rows) if r["source"] == "gsm_symbolic")
    assert "####" not in gsm


def test_worked_arithmetic_follows_precedence_and_refuses_inexact_steps():
    lines, value = arithmetic_steps("-(3 + 4) * 5 - -2")
    assert value == -33
    assert lines == ["3 + 4 = 7, so we have -7 * 5 - -2", "-7 * 5 = -35, so we have -35 - -2", "-35 - (-2) = -33"]
    assert arithmetic_steps("2 + 12 / 4")[1] == 5
    with pytest.raises(NotWorkable):
        arithmetic_steps("7 / 2")


def test_data_command_names_a_bad_mix(data, capsys):
    assert main(["data", str(data / "x"), "--mix", "chain_sum=0,basic_arithmetic=0,leg_counting=0,gsm_symbolic=0"]) == 2
    assert "--mix" in capsys.readouterr().err
    assert main(["data", str(data / "x"), "--mix", "gsm8k=1"]) == 2
    assert "'gsm8k' is not one of" in capsys.readouterr().err


def test_reasoning_gym_scorer_as_reward_fn(data):
    rows = {r["source"]: r for r in _rows(data / "a" / "train.jsonl")}
    for source, row in rows.items():
        extra = {k: row[k] for k in ("source", "template", "metadata")}
        right, wrong = f"... \\boxed{{{row['answer']}}}", f"\\boxed{{{int(row['answer']) + 7}}}"
        assert reasoning_gym(row["prompt"], right, row["answer"], extra) == 1.0, source
        assert reasoning_gym(row["prompt"], right, [row["answer"]], extra) == 1.0, source
        assert reasoning_gym(row["prompt"], wrong, row["answer"], extra) == -1.0, source
        assert reasoning_gym(row["prompt"], f"it is {row['answer']}", row["answer"], extra) == -1.0  # no box
    # a partial score (the right number inside more text) is not a reward: it is wrong
    row = rows["basic_arithmetic"]
    near = f"\\boxed{{{row['answer']} or so}}"
    assert 0 < gym_score(near, "basic_arithmetic", row["answer"], row["metadata"]) < 1
    assert reasoning_gym(row["prompt"], near, row["answer"], {"source": "basic_arithmetic",
                                                               "metadata": row["metadata"]}) == -1.0
    gsm = rows["gsm_symbolic"]
    assert math.isclose(gym_score(f"\\boxed{{{int(gsm['answer']) + 1}}}", "gsm_symbolic", gsm["answer"], {}), 0.01)
    with pytest.raises(ValueError, match="'mathdata' is not a reasoning-gym generator"):
        reasoning_gym("q", "\\boxed{1}", "1", {"source": "mathdata"})


def test_gym_config_loads_with_the_reward_fn():
    from launcher.config import load_config
    from launcher.config.schema import check_reward_fns
    cfg = load_config("configs/gym.yaml", [])
    assert cfg.reward.fns[0].fn == "policies.verify.gym_score:reasoning_gym" and cfg.reward.fns[0].weight == 5.0
    check_reward_fns(cfg)


def test_the_main_job_reports_each_held_out_part_beside_the_test_split(data, tmp_path, monkeypatch):
    """The main job's table: pass@1 in distribution, held out, and each held-out part on its own (the
    six templates' target is read there). A model right on every templated problem and wrong on every
    gsm_symbolic one scores 1 and 0 on the parts, their mean on the whole split. Run again on the same
    model, files and settings, the main job reuses the measurement; another model is measured."""
    from launcher.commands import demo
    from policies.infer.evaluate import EvalConfig
    files = {"test": data / "a" / "test.jsonl", "heldout": data / "a" / "heldout.jsonl"}
    splits = {name: (f, load_problems(f)[:4 if name == "test" else 6]) for name, f in files.items()}
    calls = []

    def evaluate(model, tok, problems, cfg, seed, label):
        calls.append(label)
        per = [{"id": p.id, "correct": cfg.k if p.extra["source"] == "mathdata" else 0, "k": cfg.k} for p in problems]
        return {"pass@1": sum(q["correct"] / q["k"] for q in per) / len(per), "problems": len(per), "k": cfg.k,
                "truncation_rate": 0.0, "temperature": cfg.temperature, "top_p": cfg.top_p, "per_problem": per}

    monkeypatch.setattr(demo, "evaluate", evaluate)
    monkeypatch.setattr(demo, "load_model", lambda path, dtype: None)
    monkeypatch.setattr(demo, "load_tokenizer", lambda path: None)
    cache = tmp_path / "evaluations.json"
    for model in ("model-a", "model-a", "model-b"):
        (tmp_path / model).mkdir(exist_ok=True)
        r = demo._eval(str(tmp_path / model), splits, EvalConfig(k=2), 0, model, cache)
    assert calls == ["model-a, test", "model-a, heldout", "model-b, test", "model-b, heldout"]
    assert r["heldout"]["mathdata"] == 1.0 and r["heldout"]["gsm_symbolic"] == 0.0
    assert r["heldout"]["pass@1"] == 0.5 and r["test"]["pass@1"] == 0.0  # test: no templated problem in it
    table = demo._table({"base": r, "rl": r}).splitlines()
    assert table[2] == ("| model | in distribution (test) | held out | held out: six templates | held out: gsm_symbolic"
                        " | truncated (test) |")
    assert table[4] == "| base | 0.000 | 0.500 | 1.000 | 0.000 | 0.00 |"
    # a data directory without a held-out split (python -m launcher.mathdata, a user's own): one column
    assert table[0].startswith("pass@1, 2 samples per problem, T 1.0")
    one = {split: {**x, "k": 1} for split, x in r.items()}   # the base row with fewer samples: the header says so
    assert demo._table({"base": one, "rl": r}).startswith("pass@1, base 1, rl 2 samples per problem")
    alone = demo._table({"base": {"test": r["test"]}}).splitlines()
    assert alone[2] == "| model | in distribution (test) | truncated (test) |"
