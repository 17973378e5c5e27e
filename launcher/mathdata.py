"""A local, deterministic generator of small arithmetic word problems (no download needed).

One-step problems with small numbers (add, subtract, multiply, divide) are within reach of a 135M
instruct model; two-step ones mostly are not, so rewards vary within a group and RL has a signal.
Every problem carries the arithmetic expression it was built from, so tests can check the answer.
`./run.sh`'s main job trains and tests on these; in `python -m launcher data`'s files (launcher.gymdata)
the six templates are held out: never trained on, half of the held-out column.

``python -m launcher.mathdata OUT_DIR --train 512 --test 64 --sft 200 --seed 0``
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from policies.data.dataset import write_jsonl

NAMES = (("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Sam", "he"), ("Lily", "she"),
         ("Omar", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Ivan", "he"), ("Mei", "she"))
ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "coins", "shells", "cards", "toy cars")
CONTAINERS = ("boxes", "bags", "baskets", "jars", "packs")


@dataclass(frozen=True)
class MathProblem:
    question: str
    expr: str          # the arithmetic the answer comes from, e.g. "(12 + 7) - 5"
    answer: int
    solution: str      # a short worked solution ending in \boxed{answer}
    kind: str          # template name
    steps: int         # 1 or 2


def _people(rng: random.Random) -> tuple[str, str, str]:
    (name, pron), (friend, _) = rng.sample(NAMES, 2)
    return name, pron, friend


def _add(rng: random.Random) -> MathProblem:
    name, pron, _ = _people(rng)
    item, a, b = rng.choice(ITEMS), rng.randint(2, 20), rng.randint(2, 20)
    q = f"{name} has {a} {item}. {pron.capitalize()} buys {b} more. How many {item} does {name} have now?"
    s = f"{name} starts with {a} {item} and buys {b} more, so {a} + {b} = {a + b}."
    return MathProblem(q, f"{a} + {b}", a + b, s, "add", 1)


def _subtract(rng: random.Random) -> MathProblem:
    name, _, friend = _people(rng)
    item, a = rng.choice(ITEMS), rng.randint(8, 30)
    b = rng.randint(1, a - 1)
    q = f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does {name} have left?"
    s = f"{name} gives away {b} of {a} {item}, so {a} - {b} = {a - b}."
    return MathProblem(q, f"{a} - {b}", a - b, s, "subtract", 1)


def _multiply(rng: random.Random) -> MathProblem:
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"There are {a} {box} with {b} {item} in each. How many {item} are there in total?"
    s = f"{a} {box} with {b} {item} each make {a} * {b} = {a * b} {item}."
    return MathProblem(q, f"{a} * {b}", a * b, s, "multiply", 1)


def _divide(rng: random.Random) -> MathProblem:
    name, _, _ = _people(rng)
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    b, per = rng.randint(2, 6), rng.randint(2, 9)
    a = b * per
    q = f"{name} puts {a} {item} equally into {b} {box}. How many {item} go in each of the {box}?"
    s = f"{a} {item} shared equally by {b} {box} is {a} / {b} = {per} each."
    return MathProblem(q, f"{a} // {b}", per, s, "divide", 1)


def _add_subtract(rng: random.Random) -> MathProblem:
    name, pron, friend = _people(rng)
    item, a, b = rng.choice(ITEMS), rng.randint(5, 40), rng.randint(3, 30)
    c = rng.randint(1, a + b - 1)
    q = (f"{name} has {a} {item}. {pron.capitalize()} buys {b} more and then gives {c} to {friend}. "
         f"How many {item} does {name} have now?")
    s = f"First, {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}."
    return MathProblem(q, f"({a} + {b}) - {c}", a + b - c, s, "add_subtract", 2)


def _multiply_add(rng: random.Random) -> MathProblem:
    name, _, _ = _people(rng)
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 25)
    q = (f"{name} already has {c} {item} and buys {a} {box} with {b} {item} in each. "
         f"How many {item} does {name} have in total?")
    s = f"The {box} hold {a} * {b} = {a * b} {item}. Adding the {c} {name} had: {a * b} + {c} = {a * b + c}."
    return MathProblem(q, f"{a} * {b} + {c}", a * b + c, s, "multiply_add", 2)


TEMPLATES: tuple[Callable[[random.Random], MathProblem], ...] = (
    _add, _subtract, _multiply, _divide, _add_subtract, _multiply_add)


def generate_problems(n: int, seed: int = 0) -> list[MathProblem]:
    """`n` problems with distinct question texts, the same for the same seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[MathProblem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not make {n} distinct problems (made {len(out)})")
        p = rng.choice(TEMPLATES)(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def sft_response(p: MathProblem) -> str:
    return f"{p.solution}\nThe answer is \\boxed{{{p.answer}}}."


def make_dataset(out_dir: str | Path, n_train: int, n_test: int, n_sft: int = 200, *,
                 seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl, test.jsonl (query_id, prompt, answer) and sft.jsonl (prompt, response).

    The three splits are disjoint by question text (they are cut from one pool of distinct questions).
    """
    out = Path(out_dir)
    pool = generate_problems(n_train + n_test + n_sft, seed)
    train, test, sft = pool[:n_train], pool[n_train:n_train + n_test], pool[n_train + n_test:]
    paths = {
        "train": write_jsonl(out / "train.jsonl", (
            {"query_id": f"train-{i}", "prompt": p.question, "answer": str(p.answer)} for i, p in enumerate(train))),
        "test": write_jsonl(out / "test.jsonl", (
            {"query_id": f"test-{i}", "prompt": p.question, "answer": str(p.answer)} for i, p in enumerate(test))),
        "sft": write_jsonl(out / "sft.jsonl", (
            {"prompt": p.question, "response": sft_response(p)} for p in sft)),
    }
    return paths


def main(argv: list[str] | None = None, *, make=make_dataset, prog: str = "python -m launcher.mathdata",
         description: str = __doc__.split("\n")[0]) -> int:
    """The command line of `make` (make_dataset, or a writer with its arguments, e.g. examples/tool_math)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--sft", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for split, path in make(a.out_dir, a.train, a.test, a.sft, seed=a.seed).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
