"""eval and filter on a GSM8K-style parquet through their layout flags; the filter writes AReaL JSONL."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from policies.data.dataset import load_problems
from launcher.__main__ import main
from tests.launch_util import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import make_gsm8k_parquet  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from policies.model.loading import load_tokenizer, save_checkpoint, smollm2_dir, tiny_model
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(tiny_model(seed=0), load_tokenizer(smollm2_dir()), out)
    return out


FLAGS = ["--prompt-key", "question", "--answer-key", "answer", "--answer-format", "gsm8k", "--device", "cpu",
         "--system-prompt", "Be brief.", "-k", "2", "--max-new-tokens", "4"]


def test_eval_and_filter_read_a_parquet_through_the_flags(tmp_path, tiny_dir, capsys):
    data = make_gsm8k_parquet.write(tmp_path / "gsm.parquet", n=3)
    res = tmp_path / "eval.json"
    assert main(["eval", "--data", str(data), "--model", str(tiny_dir), *FLAGS, "--out", str(res)]) == 0
    r = json.loads(res.read_text())
    assert [p["id"] for p in r["per_problem"]] == ["gsm.parquet:0", "gsm.parquet:1", "gsm.parquet:2"]

    out = tmp_path / "hard.jsonl"
    assert main(["filter", "--data", str(data), "--model", str(tiny_dir), *FLAGS, "--out", str(out)]) == 0
    kept = load_problems(out)                      # AReaL's layout, references already cut out
    rows = make_gsm8k_parquet.rows(3)
    assert [p.answers for p in kept] == [[r["answer"].rpartition("#### ")[2]] for r in rows]  # a random model
    assert [p.extra["difficulty"] for p in kept] == [r["difficulty"] for r in rows]          # solves none

    assert main(["eval", "--data", str(data), "--model", str(tiny_dir), "-k", "1", "--answer-key", "answer",
                 "--answer-format", "boxed"]) == 2
    assert "gsm.parquet: row 0: 'answer': no complete \\boxed{} answer" in capsys.readouterr().err
