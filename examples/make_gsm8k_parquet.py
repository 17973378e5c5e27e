"""Write a small GSM8K-style parquet file (question, answer ending in "#### N") for trying a job.

    python examples/make_gsm8k_parquet.py data/gsm8k_style/train.parquet --n 64

Then train on it through the config keys alone (README: "Bring your own data and reward")::

    python -m launcher --config configs/tiny.yaml -o data.train=data/gsm8k_style/train.parquet \\
        -o data.test=null -o data.prompt_key=question -o data.answer_key=answer -o data.answer_format=gsm8k \\
        -o 'reward.fns=[{fn: examples/gsm8k_reward.py:correct_number}]'
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ("Ann", "Ben", "Cleo", "Dev", "Eve", "Finn")
ITEMS = ("apples", "marbles", "stickers", "books", "eggs")


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 5)
        total = (a + b) * c
        out.append({
            "question": f"{name} has {a} {item} and gets {b} more. Then {name} multiplies the pile by {c}. "
                        f"How many {item} does {name} have?",
            "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n"
                      f"Then {a + b} * {c} = <<{a + b}*{c}={total}>>{total}.\n#### {total}",
            "difficulty": "easy" if c == 2 else "medium",
        })
    return out


def write(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    import datasets
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows(n, seed)).to_parquet(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the parquet file to write")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
