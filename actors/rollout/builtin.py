"""The single-turn boba recipe as a workflow (``rollout.workflow: actors.rollout.builtin:boba``): one chat
completion on the prompt the single-turn path uses, scored by the verifier. Unset, the job runs the
single-turn path itself (no rollout workers); this is for mixing it with one's own workflows and for
checking that the workflow route trains as that path does."""
from __future__ import annotations


async def boba(problem: dict, client) -> float | None:
    await client.chat.completions.create(model="policy", messages=problem["messages"])
    return None  # the verifier scores the answer: reward.correct / reward.wrong
