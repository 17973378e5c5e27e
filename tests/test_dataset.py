from __future__ import annotations

import ast
import operator
import re

import orjson
import pytest

from policies.data.dataset import DatasetError, Problem, SFTPair, load_problems, load_sft_pairs, write_jsonl
from policies.data.prompts import build_prompt
from launcher.mathdata import TEMPLATES, generate_problems, make_dataset

DIRECTIVE = "Please reason step by step, and enclose your final answer in \\boxed{}."


def jsonl(tmp_path, *lines: str, name: str = "data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


# --- loading problems ---------------------------------------------------------------------------

def test_areal_layout(tmp_path):
    p = jsonl(tmp_path,
              '{"query_id": "q1", "prompt": "What is 2+2?", "solutions": ["2+2 = \\\\boxed{4}"], "extra": 1}',
              "",
              '{"query_id": "q2", "prompt": "Half of 3?", "solutions": ["\\\\boxed{1.5}", "\\\\boxed{3/2}"]}')
    probs = load_problems(p)
    assert probs == [Problem("q1", "What is 2+2?", ["2+2 = \\boxed{4}"]),
                     Problem("q2", "Half of 3?", ["\\boxed{1.5}", "\\boxed{3/2}"])]
    assert probs.stats.lines == 2 and probs.stats.loaded == 2 and probs.stats.skipped == 0


def test_answer_layout_and_fallback_ids(tmp_path):
    p = jsonl(tmp_path,
              '{"id": 7, "question": "Q one", "answer": 42}',
              '{"problem": "Q two", "answer": "x^2"}',
              '{"prompt": "Q three", "answer": 0.5}',
              name="mixed.jsonl")
    assert load_problems(p) == [Problem("7", "Q one", ["42"]), Problem("mixed.jsonl:2", "Q two", ["x^2"]),
                                Problem("mixed.jsonl:3", "Q three", ["0.5"])]


MALFORMED = [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"answer": 3}', "missing prompt (expected one of the keys 'prompt', 'question', 'problem')"),
    ('{"prompt": 3, "answer": 3}', "'prompt' must be a string, got int"),
    ('{"prompt": "  ", "answer": 3}', "'prompt' is empty"),
    ('{"prompt": "Q"}', "missing reference (expected 'solutions' or 'answer')"),
    ('{"prompt": "Q", "solutions": []}', "'solutions' must be a non-empty list of strings"),
    ('{"prompt": "Q", "solutions": "\\\\boxed{1}"}', "'solutions' must be a non-empty list of strings"),
    ('{"prompt": "Q", "solutions": ["ok", 3]}', "'solutions'[1] must be a non-empty string, got 3"),
    ('{"prompt": "Q", "answer": true}', "'answer' must be a string or a number, got bool"),
    ('{"prompt": "Q", "answer": [1]}', "'answer' must be a string or a number, got list"),
    ('{"prompt": "Q", "answer": ""}', "'answer' is empty"),
    ('{"query_id": 1.5, "prompt": "Q", "answer": 1}', "'query_id' must be a string or an integer, got float"),
    ('{"query_id": "a", "prompt": "Q2", "answer": 1}', "duplicate id 'a' (first at line 1)"),
]


@pytest.mark.parametrize("line, fault", MALFORMED)
def test_malformed_line_names_file_line_and_fault(tmp_path, line, fault):
    p = jsonl(tmp_path, '{"query_id": "a", "prompt": "Q1", "answer": 1}', "", line)
    with pytest.raises(DatasetError) as e:
        load_problems(p)
    assert str(e.value).startswith(f"{p}:3: {fault}"), str(e.value)


def test_skip_malformed_counts_and_keeps_the_rest(tmp_path, caplog):
    lines = ['{"query_id": "a", "prompt": "Q1", "answer": 1}', ""] + [m for m, _ in MALFORMED] + \
            ['{"query_id": "z", "prompt": "Q9", "answer": 9}']
    p = jsonl(tmp_path, *lines)
    probs = load_problems(p, skip_malformed=True)
    assert [x.id for x in probs] == ["a", "z"]
    assert probs.stats.skipped == len(MALFORMED) and probs.stats.lines == len(MALFORMED) + 2
    assert probs.stats.errors[0].startswith(f"{p}:3: not valid JSON")
    assert any("skipped 14 of 16 lines" in r.message for r in caplog.records)


def test_empty_or_unreadable_file(tmp_path):
    with pytest.raises(DatasetError, match=r"no records$"):
        load_problems(jsonl(tmp_path, "", "  "))
    with pytest.raises(DatasetError, match=r"no records \(1 malformed lines skipped\)"):
        load_problems(jsonl(tmp_path, "{bad"), skip_malformed=True)
    with pytest.raises(DatasetError, match=r"missing\.jsonl: cannot read"):
        load_problems(tmp_path / "missing.jsonl")
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9", "answer": 1}\n')
    with pytest.raises(DatasetError, match=r"latin1\.jsonl:1: not valid JSON"):
        load_problems(p)


def test_sft_pairs(tmp_path):
    p = jsonl(tmp_path, '{"prompt": "P1", "response": "R1"}', '{"question": "P2", "completion": "R2"}',
              '{"prompt": "P3"}')
    with pytest.raises(DatasetError, match=r":3: missing response \(expected one of the keys 'response', 'completion'\)"):
        load_sft_pairs(p)
    pairs = load_sft_pairs(p, skip_malformed=True)
    assert pairs == [SFTPair("P1", "R1"), SFTPair("P2", "R2")] and pairs.stats.skipped == 1
    assert pairs[0] == ("P1", "R1")


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    write_jsonl(p, [{"prompt": "P", "response": "R"}, SFTPair("P2", "R2")])
    assert load_sft_pairs(p) == [("P", "R"), ("P2", "R2")]

    def boom():
        yield {"prompt": "new", "response": "x"}
        raise RuntimeError("writer died")
    with pytest.raises(RuntimeError):
        write_jsonl(p, boom())
    assert load_sft_pairs(p) == [("P", "R"), ("P2", "R2")]          # the old file is untouched
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.jsonl"]  # no temp file left


# --- the chat prompt, with the real SmolLM2 tokenizer ------------------------------------------

@pytest.fixture
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_build_prompt_applies_chat_template_and_directive(tokenizer):
    ids = build_prompt(tokenizer, "What is 2+3?", DIRECTIVE)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is 2+3? " + DIRECTIVE + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(build_prompt(tokenizer, "Q", "")).count("Q<|im_end|>") == 1


def test_build_prompt_force_newline(tokenizer):
    plain = build_prompt(tokenizer, "What is 2+3?", DIRECTIVE)
    forced = build_prompt(tokenizer, "What is 2+3?", DIRECTIVE, force_newline=True)
    assert forced[:len(plain)] == plain and len(forced) == len(plain) + 1
    assert tokenizer.decode(forced[len(plain):]) == "\n"


def test_build_prompt_handles_plain_lists_too():
    class ListTokenizer:   # older transformers return a plain list of ids
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and tokenize
            return [ord(c) for c in messages[0]["content"]]

        def encode(self, text, add_special_tokens):
            return [ord(c) for c in text]

    assert build_prompt(ListTokenizer(), "a", "b", force_newline=True) == [ord("a"), ord(" "), ord("b"), 10]


# --- the local arithmetic dataset -------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def evaluate(expr: str) -> int:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unexpected expression {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


def test_generated_answers_are_correct():
    probs = generate_problems(600, seed=3)
    assert {p.kind for p in probs} == {t.__name__.lstrip("_") for t in TEMPLATES}
    for p in probs:
        assert evaluate(p.expr) == p.answer and p.answer >= 0
        if p.kind == "divide":
            a, b = map(int, re.findall(r"\d+", p.expr))
            assert a % b == 0                           # whole-number answers only
        # every operand of the expression is stated in the question
        q_numbers = re.findall(r"\d+", p.question)
        assert sorted(re.findall(r"\d+", p.expr)) == sorted(q_numbers), p
        assert p.solution.rstrip().endswith(f"= {p.answer}.") or f"= {p.answer} " in p.solution
    one_step = sum(p.steps == 1 for p in probs) / len(probs)
    assert 0.5 < one_step < 0.8                         # mostly easy, some two-step


def test_verbs_match_operations():
    # an independent reading of the question text for the one-step templates
    for p in generate_problems(300, seed=4):
        n = list(map(int, re.findall(r"\d+", p.question)))
        if p.kind == "add":
            assert "buys" in p.question and p.answer == n[0] + n[1]
        elif p.kind == "subtract":
            assert "gave" in p.question and p.answer == n[0] - n[1]
        elif p.kind == "multiply":
            assert "in each" in p.question and p.answer == n[0] * n[1]
        elif p.kind == "divide":
            assert "equally" in p.question and p.answer * n[1] == n[0]
        elif p.kind == "add_subtract":
            assert p.answer == n[0] + n[1] - n[2]
        elif p.kind == "multiply_add":   # "already has c ... buys a boxes with b each"
            assert p.answer == n[0] + n[1] * n[2]


def test_make_dataset_is_deterministic_disjoint_and_loadable(tmp_path):
    a = make_dataset(tmp_path / "a", 50, 20, 30, seed=7)
    b = make_dataset(tmp_path / "b", 50, 20, 30, seed=7)
    c = make_dataset(tmp_path / "c", 50, 20, 30, seed=8)
    for split in ("train", "test", "sft"):
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()

    train, test = load_problems(a["train"]), load_problems(a["test"])
    sft = load_sft_pairs(a["sft"])
    assert (len(train), len(test), len(sft)) == (50, 20, 30)
    texts = [{p.prompt for p in train}, {p.prompt for p in test}, {s.prompt for s in sft}]
    assert sum(map(len, texts)) == len(set().union(*texts)) == 100
    assert train[0].id == "train-0" and re.fullmatch(r"\d+", train[0].answers[0])
    rec = orjson.loads(a["train"].read_bytes().splitlines()[0])
    assert set(rec) == {"query_id", "prompt", "answer"}
    for pair in sft:
        boxed = re.findall(r"\\boxed\{(\d+)\}", pair.response)
        assert len(boxed) == 1 and pair.response.endswith(f"\\boxed{{{boxed[0]}}}.")
    # the SFT answer is the generator's answer for that question
    by_q = {p.question: p.answer for p in generate_problems(100, seed=7)}
    assert all(int(re.search(r"\\boxed\{(\d+)\}", s.response).group(1)) == by_q[s.prompt] for s in sft)
