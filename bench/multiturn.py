"""Multi-turn rollouts (sessions on the OpenAI endpoint) against single-turn groups, on one torch generator.

One Generator, built by the job's own builder (launcher.job.builders.generator) on a real broker, serves
both arms with the same model, sampling (rollout.* defaults: temperature 1, top-p 1, the tokenizer's stop
ids) and prompts (the project's arithmetic data, as the sampler and a rollout worker phrase them):
- single: each prompt's group of G through Backend.generate_group(n=G), as a GENERATE runs it,
  max_new_tokens = --new-tokens; all prompts at once;
- multi: G sessions per prompt (OPEN_SESSION over the bus from a rollout-role client, as a rollout worker
  opens them), each driven by the `openai` package's AsyncOpenAI: the question, then "check your answer"
  follow-ups, --turns chat turns in all, CLOSE_SESSION and its tokens over a tensor channel; the same
  sampled-token budget per trajectory (session max_tokens = --new-tokens, each turn --new-tokens // --turns);
  all sessions at once.
Sampled tokens are the completions' tokens (what the loss mask covers); a turn may stop early on a stop
token. The arms alternate (single first, the order flipped each round) so drift hits both alike; the
summary takes medians.

    nice -n 10 .venv/bin/python bench/multiturn.py [--model tiny|smollm2 --prompts 4 --group 4
                                                   --new-tokens 48 --turns 3 --rounds 3 --threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors import protocol as P  # noqa: E402
from actors.rollout.actor import RolloutSettings, problem_for  # noqa: E402
from bus.broker import Broker  # noqa: E402
from bus.client import BusClient  # noqa: E402
from tensors.channels import Channels, TensorOptions  # noqa: E402
from launcher.config.yaml_io import load_config  # noqa: E402
from launcher.job.builders.generator import build as build_generator  # noqa: E402
from launcher.job.builders.sampler import sampling_params  # noqa: E402
from launcher.job.plan import bus_kwargs  # noqa: E402
from launcher.job.start import Start, base_model_path  # noqa: E402
from launcher.mathdata import make_dataset  # noqa: E402
from policies.data.dataset import load_problems  # noqa: E402
from policies.data.prompts import build_prompt, stop_ids  # noqa: E402

CHECK = "Check your answer, then give the final answer in \\boxed{}."
_rids = itertools.count()


async def single_turn(gen, prompts: list[list[int]], group: int, sampling: dict) -> dict:
    """Every prompt's group through the generator's plain path, at once."""
    t0 = time.perf_counter()
    groups = await asyncio.gather(*(gen.backend.generate_group(f"single-{next(_rids)}", ids, group, sampling)
                                    for ids in prompts))
    wall = time.perf_counter() - t0
    return {"wall": wall, "rollouts": sum(map(len, groups)),
            "tokens": sum(len(s.output_ids) for g in groups for s in g), "turns": len(groups) * group}


async def agent(url: str, key: str, messages: list[dict], turns: int) -> None:
    """A scripted agent written against `openai` only: the question, then follow-ups asking it to check."""
    import openai
    async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600.0) as client:
        messages = list(messages)
        for _ in range(turns):
            reply = await client.chat.completions.create(model="policy", messages=messages)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                         {"role": "user", "content": CHECK}]


RX: Channels | None = None  # the rollout side's tensor channels (made in run)


async def session(rollout: BusClient, gen: str, messages: list[dict], sampling: dict, budget: int,
                  turns: int) -> dict:
    sid = f"multi-{next(_rids)}"
    opened = await rollout.request(gen, P.OPEN_SESSION, {"sid": sid, "sampling": sampling, "max_tokens": budget,
                                                         "max_turns": turns, "deadline_s": 3600.0}, timeout=30)
    await agent(opened["base_url"], opened["api_key"], messages, turns)
    closed = await rollout.request(gen, P.CLOSE_SESSION, {"sid": sid}, timeout=30)
    if closed["segments_ref"] is not None:  # the trajectory's tokens, as a rollout worker takes them
        await RX.recv(closed["segments_ref"], timeout=30)
    return closed


async def multi_turn(rollout: BusClient, gen: str, chats: list[list[dict]], group: int, sampling: dict,
                     budget: int, turns: int) -> dict:
    """G sessions per prompt, every session at once."""
    t0 = time.perf_counter()
    closed = await asyncio.gather(*(session(rollout, gen, m, sampling, budget, turns)
                                    for m in chats for _ in range(group)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "rollouts": len(closed), "tokens": sum(c["completion_tokens"] for c in closed),
            "turns": sum(c["turns"] for c in closed)}


def line(arm: str, r: dict) -> str:
    return (f"{arm:<6} {r['rollouts']:4d} rollouts, {r['tokens']:6d} sampled tokens, "
            f"{r['turns'] / r['rollouts']:.2f} turns each, in {r['wall']:7.2f} s = "
            f"{r['tokens'] / r['wall']:7.1f} tok/s, {r['rollouts'] / r['wall']:6.2f} rollouts/s")


async def run(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-multiturn-"))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp / 'run'}", f"model.path={args.model}", f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.request_timeout=3600"])
    problems = load_problems(make_dataset(tmp, n_train=args.prompts, n_test=0, n_sft=0, seed=0)["train"])
    settings = RolloutSettings(max_turns=args.turns, max_trajectory_tokens=args.new_tokens, workflow_timeout=3600.0,
                               directive=cfg.data.prompt_directive, system_prompt=cfg.data.system_prompt)
    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=cfg.bus.heartbeat_interval)
    await broker.start()
    start = Start(0, base_model_path(cfg))
    (gen,) = build_generator(cfg, start, "generator-0", broker.address, bus_kwargs(cfg, P.GENERATOR))
    rollout = BusClient(broker.address, "rollout-0", P.ROLLOUT, **bus_kwargs(cfg, P.ROLLOUT))
    global RX
    RX = Channels(TensorOptions(host=gen.channels.host))
    try:
        await gen.start()
        await rollout.connect(timeout=30)
        tok = gen.tokenizer
        single_sampling = sampling_params(cfg, stop_ids(tok))
        multi_sampling = {**single_sampling, "max_new_tokens": args.new_tokens // args.turns}
        prompts = [build_prompt(tok, p.prompt, cfg.data.prompt_directive, cfg.rollout.force_newline,
                                system_prompt=cfg.data.system_prompt) for p in problems]
        chats = [problem_for({"qid": p.id, "answers": p.answers, "problem": {"prompt": p.prompt}}, settings)["messages"]
                 for p in problems]
        arms = {"single": lambda p, c, g: single_turn(gen, p, g, single_sampling),
                "multi": lambda p, c, g: multi_turn(rollout, gen.name, c, g, multi_sampling, args.new_tokens,
                                                    args.turns)}
        for fn in arms.values():  # warm-up: one small group each (threads, first HTTP connections)
            await fn(prompts[:1], chats[:1], min(2, args.group))
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for rnd in range(args.rounds):
            for arm in (list(arms) if rnd % 2 == 0 else list(arms)[::-1]):  # a, b, then b, a
                results[arm].append(r := await arms[arm](prompts, chats, args.group))
                print(f"  round {rnd}: {line(arm, r)}", flush=True)
    finally:
        await RX.close()
        await rollout.close()
        await gen.stop()
        await broker.stop()
    med = {arm: {k: statistics.median(r[k] / r["wall"] for r in rs) for k in ("tokens", "rollouts")}
           for arm, rs in results.items()}
    turns = sum(r["turns"] for r in results["multi"]) / sum(r["rollouts"] for r in results["multi"])
    print(f"\nsummary (median of {args.rounds} rounds):")
    print(f"  single-turn: {med['single']['tokens']:7.1f} sampled tok/s, {med['single']['rollouts']:6.2f} rollouts/s")
    print(f"  multi-turn : {med['multi']['tokens']:7.1f} sampled tok/s, {med['multi']['rollouts']:6.2f} "
          f"trajectories/s, {turns:.2f} turns per trajectory")
    print(f"  ratio multi/single: {med['multi']['tokens'] / med['single']['tokens']:.2f}x tok/s, "
          f"{med['multi']['rollouts'] / med['single']['rollouts']:.2f}x rollouts/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                    help="tiny: a random tiny model; smollm2: the converted SmolLM2-135M-Instruct (no hub download)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per round")
    ap.add_argument("--group", type=int, default=4, help="samples (single) or sessions (multi) per prompt (G)")
    ap.add_argument("--new-tokens", type=int, default=48, help="sampled-token budget per rollout / trajectory")
    ap.add_argument("--turns", type=int, default=3, help="chat turns per trajectory (the question + follow-ups)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both arms, alternating")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    for flag in ("prompts", "group", "new_tokens", "turns", "rounds", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')}: expected an int >= 1, got {getattr(args, flag)}")
    if args.new_tokens < args.turns:
        ap.error(f"--new-tokens {args.new_tokens}: expected at least --turns ({args.turns}), one token a turn")
    torch.set_num_threads(args.threads)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, {args.threads} torch threads; torch engine, model {args.model} fp32")
    print(f"{args.prompts} prompts x G {args.group}, {args.new_tokens} sampled tokens per rollout "
          f"(multi: {args.turns} turns of <= {args.new_tokens // args.turns}), {args.rounds} rounds", flush=True)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
