"""Tool-integrated math: the model may run Python before it answers (``rollout.workflow:
examples.tool_math.workflow:workflow``).

Each turn the model either writes a ```python block and stops, and the workflow runs it in the sandbox
(actors.rollout.sandbox) and answers with a user turn "Output: ..." (its stdout, or the error's last line),
or it answers with \\boxed{}. After `MAX_TURNS` model calls the last answer stands. The workflow returns
None: the verifier scores the last assistant text's \\boxed{} against the reference (reward.correct /
reward.wrong), exactly as it scores the single-turn recipe, so the two are comparable.

The session's own caps (rollout.max_turns, the token budget, the deadline) still apply on the generator.
"""
from __future__ import annotations

import re

from actors.rollout.sandbox import ToolResult, run_python

TOOL_PROMPT = ("You can run Python: write code in a ```python block and stop, and you will get its output. "
               "Put the final answer in \\boxed{}.")
MAX_TURNS = 4
OUTPUT_CHARS = 300
TOOL_LIMITS = {"timeout_s": 5.0, "memory_mb": 512, "max_procs": 8, "output_limit": 2000}
_CODE = re.compile(r"```python[ \t]*\n(.*?)```", re.S)


def first_messages(question: str) -> list[dict]:
    """The conversation's opening (make_sft.py writes the same, so SFT teaches what RL asks)."""
    return [{"role": "user", "content": f"{question} {TOOL_PROMPT}"}]


def tool_code(text: str) -> str | None:
    """The code of the turn's last ```python block, unless the turn already gives a \\boxed{} answer."""
    if "\\boxed" in text:
        return None
    blocks = _CODE.findall(text)
    return blocks[-1] if blocks else None


def observation(r: ToolResult) -> str:
    """The user turn that carries a tool result back: short, since a small model reads it."""
    if r.reason == "timeout":
        text = f"timed out after {TOOL_LIMITS['timeout_s']:g} s"
    elif r.reason == "ok" or (r.reason == "output_limit" and r.stdout):
        text = r.stdout.strip() or "(no output: print the result)"
    else:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else f"failed ({r.reason}, exit {r.exit})"
    return "Output: " + (text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + " ...")


async def workflow(problem: dict, client) -> None:
    messages = first_messages(problem["prompt"])
    for turn in range(MAX_TURNS):
        reply = await client.chat.completions.create(model="policy", messages=messages)
        text = reply.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": text})
        code = tool_code(text)
        if code is None or turn == MAX_TURNS - 1 or reply.choices[0].finish_reason == "length":
            break
        messages.append({"role": "user", "content": observation(await run_python(code, **TOOL_LIMITS))})
    return None
