"""Bring-your-own data: GSM8K- and MATH-style files in JSONL, JSON, parquet, arrow and saved directories."""
from __future__ import annotations

import orjson
import pytest

from policies.data.answers import extract_answer
from policies.data.dataset import DatasetError, Layout, Problem, load_problems
from policies.data.prompts import build_prompt

GSM8K = [
    {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A farm sells 1,200 eggs a day. Eggs in 2 days?", "answer": "1200*2=2400\n#### 2,400"},
]
MATH = [
    {"problem": "Compute $1/2 + 1/4$.", "solution": "We get $\\boxed{\\frac{3}{4}}$.", "level": "Level 1",
     "type": "Algebra", "unique_id": "alg/1"},
    {"problem": "What is $2^3$?", "solution": "$2^3 = \\boxed{8}$", "level": "Level 2", "type": "Algebra",
     "unique_id": "alg/2"},
]
GSM8K_LAYOUT = Layout(prompt_key="question", answer_key="answer", answer_format="gsm8k")
MATH_LAYOUT = Layout(prompt_key="problem", answer_key="solution", id_key="unique_id", answer_format="boxed")


def write(tmp_path, rows, fmt, name="train"):
    import datasets
    ds = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        p = tmp_path / f"{name}.jsonl"
        p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    elif fmt == "json":
        p = tmp_path / f"{name}.json"
        p.write_bytes(orjson.dumps(rows))
    elif fmt == "parquet":
        p = tmp_path / f"{name}.parquet"
        ds.to_parquet(str(p))
    elif fmt == "arrow":
        p = tmp_path / f"{name}.arrow"
        import pyarrow as pa
        table = ds.data.table
        with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    elif fmt == "saved":
        p = tmp_path / f"{name}_saved"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(p))
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow", "saved"])
def test_gsm8k_style_in_every_format(tmp_path, fmt):
    probs = load_problems(write(tmp_path, GSM8K, fmt), layout=GSM8K_LAYOUT)
    assert [p.prompt for p in probs] == [r["question"] for r in GSM8K]
    assert [p.answers for p in probs] == [["7"], ["2400"]]      # "#### 2,400" -> "2400"
    assert probs.stats.loaded == 2


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_math_style_boxed_solution_ids_and_extra_fields(tmp_path, fmt):
    probs = load_problems(write(tmp_path, MATH, fmt), layout=MATH_LAYOUT)
    assert [(p.id, p.answers) for p in probs] == [("alg/1", ["\\frac{3}{4}"]), ("alg/2", ["8"])]
    assert probs[0].extra == {"level": "Level 1", "type": "Algebra"}   # the columns not mapped


def test_saved_dataset_dict_split_is_chosen_and_a_missing_one_named(tmp_path):
    p = write(tmp_path, GSM8K, "saved")
    assert len(load_problems(p, layout=Layout(**{**GSM8K_LAYOUT.__dict__, "split": "test"}))) == 1
    with pytest.raises(DatasetError, match=r"no split 'dev' \(data.split\); it has train, test"):
        load_problems(p, layout=Layout(**{**GSM8K_LAYOUT.__dict__, "split": "dev"}))


def test_row_errors_name_the_file_the_row_and_the_columns(tmp_path):
    rows = [GSM8K[0], {"question": "no final answer", "answer": "it is 5"}]
    p = write(tmp_path, rows, "parquet")
    with pytest.raises(DatasetError, match=r"train\.parquet: row 1: 'answer': no '####'.*gsm8k.*'it is 5'"):
        load_problems(p, layout=GSM8K_LAYOUT)
    kept = load_problems(p, layout=GSM8K_LAYOUT, skip_malformed=True)
    assert len(kept) == 1 and kept.stats.skipped == 1
    with pytest.raises(DatasetError, match=r"row 0: missing prompt \(expected one of the keys 'prompt_text'\); "
                                           r"the row has 'question', 'answer'"):
        load_problems(p, layout=Layout(prompt_key="prompt_text", answer_key="answer"))
    # JSONL keeps file:line
    q = write(tmp_path, rows, "jsonl")
    with pytest.raises(DatasetError, match=r"train\.jsonl:2: 'answer': no '####'"):
        load_problems(q, layout=GSM8K_LAYOUT)


def test_unreadable_or_unknown_inputs_are_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"broken\.parquet: cannot read as parquet"):
        load_problems(bad)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DatasetError, match=r"plain_dir: a directory, but not one written by datasets' save_to_disk"):
        load_problems(tmp_path / "plain_dir")


def test_answer_formats():
    assert extract_answer("so 18 eggs.\n#### 18", "gsm8k") == "18"
    assert extract_answer("#### $1,000.", "gsm8k") == "1000"
    assert extract_answer("a \\boxed{1} then \\boxed{\\frac{1}{2}}", "boxed") == "\\frac{1}{2}"
    assert extract_answer("anything \\boxed{2}", "raw") == "anything \\boxed{2}"
    with pytest.raises(ValueError, match="no complete"):
        extract_answer("\\boxed{cut off", "boxed")


def test_default_layout_is_unchanged_and_extra_is_not_identity(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"query_id": "q1", "prompt": "P", "solutions": ["\\\\boxed{4}"], "source": "x"}\n')
    [prob] = load_problems(p)
    assert prob == Problem("q1", "P", ["\\boxed{4}"]) and prob.extra == {"source": "x"}


def test_system_prompt_comes_first_in_the_chat_template():
    class Tok:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [ord(m["role"][0]) for m in messages]

        def encode(self, text, add_special_tokens):
            return [10]
    assert build_prompt(Tok(), "q", "d") == [ord("u")]
    assert build_prompt(Tok(), "q", "d", system_prompt="be brief") == [ord("s"), ord("u")]
