"""pass@1 of a multi-turn workflow (``python -m launcher eval --workflow SPEC``).

Each of the k samples of a problem runs ``rollout.workflow`` in a session of its own, as in training: the
same worker processes (pool.py), the same OpenAI endpoint and sessions (actors.generator), the same
scoring (the workflow's reward, or the verifier's judgement of the last assistant text), against the
model on an in-process torch engine bound to loopback. A sample is correct when the verifier says so, or
when the workflow returned a reward > 0; a failed workflow counts as wrong and in ``workflow_errors``.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time

from actors.generator.chat_template import ChatTemplate
from actors.generator.openai_api import OpenAIServer
from actors.generator.sessions import Session
from actors.generator.torch_backend import TorchBackend
from actors.rollout.actor import RolloutSettings, problem_for
from actors.rollout.pool import Outcome, WorkflowPool
from actors.rollout.trajectory import TRUNCATED
from policies.data.prompts import DIRECTIVE, stop_ids
from policies.infer.evaluate import MAX_ACTIVE_SEQUENCES, EvalConfig, summarise

log = logging.getLogger("actors.rollout.evaluate")


def evaluate_workflow(model, tokenizer, problems, cfg: EvalConfig, spec: str, *, max_turns: int, max_tokens: int,
                      timeout: float, workers: int = 2, memory_limit_mb: int | None = 4096, seed: int = 1,
                      directive: str = DIRECTIVE, system_prompt: str | None = None, pool=None,
                      label: str = "eval") -> dict:
    """`policies.infer.evaluate.evaluate`'s result for a workflow, plus the mean turns per sample and the
    count of failed workflows; raises RuntimeError when the workflow processes cannot start (the workflow
    does not import in them)."""
    settings = RolloutSettings(max_turns=max_turns, max_trajectory_tokens=max_tokens, workflow_timeout=timeout,
                               directive=directive, system_prompt=system_prompt)
    runs = asyncio.run(_sample(model, tokenizer, problems, cfg, spec, settings, workers, memory_limit_mb, seed,
                               label))
    rows = [runs[i * cfg.k:(i + 1) * cfg.k] for i in range(len(problems))]
    texts = [[closed.get("last_text") for _, closed in row] for row in rows]
    truncated = [[closed.get("finish") in TRUNCATED for _, closed in row] for row in rows]
    judged = [False if o.error is not None or (o.reward is None and closed.get("last_text") is None)
              else None if o.reward is None else o.reward > 0 for o, closed in runs]
    result = summarise(problems, texts, truncated, cfg, pool=pool, judged=judged)
    result["turns"] = sum(int(closed.get("turns", 0)) for _, closed in runs) / max(1, len(runs))
    result["workflow_errors"] = sum(o.error is not None for o, _ in runs)
    result["workflow"] = spec
    return result


async def _sample(model, tokenizer, problems, cfg: EvalConfig, spec: str, s: RolloutSettings, workers: int,
                  memory_limit_mb: int | None, seed: int, label: str) -> list[tuple[Outcome, dict]]:
    """(outcome, the closed session) of each sample, problem by problem, k each."""
    backend = TorchBackend(model, stop_token_ids=tuple(stop_ids(tokenizer)), max_batch_size=MAX_ACTIVE_SEQUENCES,
                           seed=seed)

    async def generate(rid: str, prompt_ids: list[int], sampling: dict):
        return (await backend.generate_group(rid, prompt_ids, 1, sampling))[0]

    server = OpenAIServer(generate, host="127.0.0.1", turn_timeout=s.workflow_timeout)
    pool = WorkflowPool(spec, workers=workers, timeout=s.workflow_timeout, memory_limit_mb=memory_limit_mb)
    template = ChatTemplate(tokenizer)
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    room = asyncio.Semaphore(MAX_ACTIVE_SEQUENCES)
    total, done, t0 = len(problems) * cfg.k, 0, time.monotonic()

    async def one(problem: dict) -> tuple[Outcome, dict]:
        nonlocal done
        async with room:
            sid = secrets.token_hex(8)
            opened = server.open(Session(sid, template, tokenizer, sampling=sampling,
                                         max_tokens=s.max_trajectory_tokens,
                                         deadline=server.clock() + s.workflow_timeout, max_turns=s.max_turns))
            try:
                outcome = await pool.run(problem, opened["base_url"], opened["api_key"])
            finally:
                closed = server.close_session(sid)
            done += 1
            return outcome, closed

    async def progress() -> None:
        while True:
            await asyncio.sleep(15)
            log.info("%s: %d/%d workflow samples (%.0f s)", label, done, total, time.monotonic() - t0)

    await backend.start()
    try:
        await server.start()
        await pool.start()
        ticker = asyncio.create_task(progress())
        try:
            return await asyncio.gather(*(
                one(problem_for({"qid": p.id, "answers": p.answers, "problem": {"prompt": p.prompt, "extra": p.extra}},
                                s))
                for p in problems for _ in range(cfg.k)))
        finally:
            ticker.cancel()
    finally:
        pool.close()
        await server.close()
        await backend.close()
