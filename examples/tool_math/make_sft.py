"""SFT data that teaches the Python tool's call format on the project's arithmetic problems.

``python -m examples.tool_math.make_sft OUT_DIR --train 512 --test 64 --sft 200 --seed 0`` writes what
``python -m launcher.mathdata`` writes with the same arguments (train.jsonl, test.jsonl, sft.jsonl: the same
problems) and sft_tool.jsonl: the sft split as conversations in the workflow's format, for
``python -m launcher sft --data OUT_DIR/sft_tool.jsonl`` (a `messages` row: loss on assistant turns only)::

    user:      {question} {TOOL_PROMPT}
    assistant: {expression in words} ```python print(expr) ```
    user:      Output: {answer}
    assistant: The answer is \\boxed{answer}.
"""
from __future__ import annotations

import sys
from pathlib import Path

from examples.tool_math.workflow import first_messages
from launcher import mathdata
from launcher.mathdata import MathProblem, generate_problems, make_dataset
from policies.data.dataset import write_jsonl


def tool_conversation(p: MathProblem) -> dict:
    """One worked problem: the model writes the expression as code, reads its output, answers."""
    call = f"I compute {p.expr} with Python.\n```python\nprint({p.expr})\n```"
    return {"messages": [*first_messages(p.question),
                         {"role": "assistant", "content": call},
                         {"role": "user", "content": f"Output: {p.answer}"},
                         {"role": "assistant", "content": f"The answer is \\boxed{{{p.answer}}}."}]}


def make_tool_sft(out_dir: str | Path, n_train: int, n_test: int, n_sft: int, *, seed: int = 0) -> dict[str, Path]:
    """launcher.mathdata's three files plus sft_tool.jsonl, the same sft problems in the tool format."""
    paths = make_dataset(out_dir, n_train, n_test, n_sft, seed=seed)
    sft = generate_problems(n_train + n_test + n_sft, seed)[n_train + n_test:]  # make_dataset's sft split
    paths["sft_tool"] = write_jsonl(Path(out_dir) / "sft_tool.jsonl", (tool_conversation(p) for p in sft))
    return paths


def main(argv: list[str] | None = None) -> int:
    return mathdata.main(argv, make=make_tool_sft, prog="python -m examples.tool_math.make_sft",
                         description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
