"""The prompt sampler: data.train as chat prompts, dealt under rollout.* (batch size, group size,
staleness bound) for train.steps batches."""
from __future__ import annotations

from actors.base import Actor
from launcher.config.schema import ExperimentConfig, max_refills
from launcher.job.data import load_train_problems
from launcher.job.start import Start


def sampling_params(cfg: ExperimentConfig, stop_token_ids: list[int]) -> dict:
    r = cfg.rollout
    return {"max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "stop_token_ids": stop_token_ids}


def build(cfg: ExperimentConfig, start: Start, name: str, bus_address: str, bus_kwargs: dict,
          instances: int = 1) -> list[Actor]:
    from actors.sampler.sampler import PromptSampler, SamplerConfig
    from policies.data.prompts import build_prompt, stop_ids
    from policies.model.loading import load_tokenizer
    tok = load_tokenizer(start.model_path)
    problems = load_train_problems(cfg)
    prompt_ids = [build_prompt(tok, p.prompt, cfg.data.prompt_directive, cfg.rollout.force_newline,
                               system_prompt=cfg.data.system_prompt)
                  for p in problems]
    too_long = [p.id for p, ids in zip(problems, prompt_ids) if len(ids) > cfg.data.max_prompt_tokens]
    if too_long:
        raise ValueError(f"{cfg.data.train}: {len(too_long)} prompts exceed data.max_prompt_tokens="
                         f"{cfg.data.max_prompt_tokens} (first: {too_long[0]})")
    sc = SamplerConfig(batch_prompts=cfg.rollout.batch_prompts, group_size=cfg.rollout.group_size,
                       max_staleness=cfg.rollout.max_staleness, total_batches=cfg.train.steps, seed=cfg.seed,
                       sampling=sampling_params(cfg, stop_ids(tok)),
                       request_timeout=cfg.rollout.request_timeout, max_refills=max_refills(cfg),
                       deal_to="rollout" if cfg.rollout.workflow else "generator")
    return [PromptSampler(bus_address, problems=problems, prompt_ids=prompt_ids, cfg=sc,
                          start_batch=start.step, name=name, **bus_kwargs)]
