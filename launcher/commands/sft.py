"""`python -m launcher sft`: supervised fine-tuning on (prompt, response) pairs or multi-turn conversations
(`messages` rows: loss on the assistant turns only), on the same packed batches as RL.

`train_sft` is also the main job's SFT stage (configs/demo.yaml `sft.*`)."""
from __future__ import annotations

import argparse
import logging
import random
import time

import torch

from launcher.commands.inputs import add_model_flags, failed, load_inputs
from launcher.config.flags import add_flags, settings_from
from launcher.config.schema import ExperimentConfig
from policies.data.dataset import SFTChat, load_sft_pairs
from policies.data.prompts import DIRECTIVE, build_prompt, chat_sft_ids
from policies.model.loading import compile_layers
from policies.train.ppo import SFTConfig, make_optimizer, sft_step
from tensors.packed import PackedBatch

log = logging.getLogger("launcher.commands.sft")


def sft_sequences(tokenizer, pairs, directive: str = DIRECTIVE) -> list[dict]:
    """Chat-formatted prompt (no loss) + response ending in the end-of-turn token (loss); a conversation
    (`SFTChat`) as it is, with loss on its assistant turns only."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id
    seqs = []
    for pair in pairs:
        if isinstance(pair, SFTChat):
            ids, mask = chat_sft_ids(tokenizer, pair.messages, end)
            seqs.append({"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask)})
            continue
        prompt, response = pair
        p = build_prompt(tokenizer, prompt, directive)
        r = tokenizer.encode(response, add_special_tokens=False) + [end]
        seqs.append({"input_ids": torch.tensor(p + r), "loss_mask": torch.tensor([False] * len(p) + [True] * len(r))})
    return seqs


def train_sft(model, tokenizer, pairs, cfg: SFTConfig, *, seed: int = 1, on_step=None) -> list[dict]:
    seqs = sft_sequences(tokenizer, pairs)
    opt = make_optimizer(model, cfg)
    if cfg.compile:
        compile_layers(model)
    rng = random.Random(seed)
    history, step, t0 = [], 0, time.monotonic()
    steps_total = cfg.epochs * ((len(seqs) + cfg.batch_size - 1) // cfg.batch_size)
    model.train()
    for epoch in range(cfg.epochs):
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for lo in range(0, len(order), cfg.batch_size):
            batch = PackedBatch.from_sequences([seqs[i] for i in order[lo:lo + cfg.batch_size]])
            stats = sft_step(model, opt, batch, cfg)
            step += 1
            stats = {"step": step, "epoch": epoch, **{k: float(v) for k, v in stats.items()}}
            history.append(stats)
            if on_step:
                on_step(stats)
            log.info("sft step %d/%d epoch %d loss %.4f (%.0f s)", step, steps_total, epoch,
                     stats.get("loss", float("nan")), time.monotonic() - t0)
    if getattr(opt, "master_weights", False):
        opt.release()  # the fp32 master weights, not their bf16 copies, are what is saved
    model.eval()
    return history


FLAGS = ("epochs", "lr", "batch_size", "bf16", "compile")


def add_sft_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--out", required=True)
    add_flags(p, SFTConfig, *FLAGS)
    add_flags(p, ExperimentConfig, "seed")


def run_sft(args) -> int:
    from policies.model.loading import save_checkpoint
    try:
        cfg = settings_from(args, SFTConfig, *FLAGS)
        _, model, tok, pairs = load_inputs(args, lambda a: load_sft_pairs(a.data))
    except (ValueError, OSError) as exc:
        return failed(exc)
    torch.manual_seed(args.seed)
    history = train_sft(model, tok, pairs, cfg, seed=args.seed)
    out = save_checkpoint(model, tok, args.out)
    print(f"SFT done: {len(history)} steps, final loss {history[-1]['loss']:.4f} -> {out}")
    return 0
