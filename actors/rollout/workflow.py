"""What a workflow is and how one is found: ``rollout.workflow: package.module:function`` (or
``path/to/file.py:function``), an ``async def workflow(problem: dict, client) -> float | None``.

``problem`` holds the prompt's ``id``, ``prompt`` (the problem's text), ``answers``, ``extra`` (the data
row's other columns) and ``messages`` (the chat the single-turn recipe would send: system prompt, then the
problem with data.prompt_directive). ``client`` is an ``openai.AsyncOpenAI`` bound to this sample's session
on a generator: every completion it asks for is sampled by the policy and recorded for training. The
workflow returns the sample's reward, or None for the verifier to score the last assistant text against
``answers`` (reward.*). This module imports nothing heavy: worker processes load it first.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Awaitable, Callable

from policies.verify.reward_fns import RewardFnError, import_function

Workflow = Callable[[dict, Any], Awaitable["float | None"]]


class WorkflowError(ValueError):
    """A `rollout.workflow` that cannot be used; the message says why (the caller adds the key)."""


def load_workflow(spec: str) -> Workflow:
    """Import the function ``spec`` names and check it is an ``async def`` taking (problem, client)."""
    try:
        fn = import_function(spec, prefix="boba_workflow")
    except RewardFnError as e:
        raise WorkflowError(str(e)) from None
    if not inspect.iscoroutinefunction(fn):
        raise WorkflowError(f"{spec!r}: {getattr(fn, '__name__', fn)!r} must be an async def "
                            "workflow(problem, client)")
    try:
        inspect.signature(fn).bind({}, None)
    except TypeError as e:
        raise WorkflowError(f"{spec!r}: must take (problem, client): {e}") from None
    return fn


def check_reward(value: Any) -> float | None:
    """A workflow's return value as a reward: None, or a finite number (a bool counts as 0/1)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the workflow returned {value!r:.80}, expected a finite number or None")
    return float(value)
