"""`python -m launcher data OUT_DIR`: train / SFT / test / held-out files from reasoning-gym (launcher.gymdata)."""
from __future__ import annotations

import argparse
import sys

from launcher.gymdata import HELDOUT_GSM_TEMPLATES, MIX, Source


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="where train.jsonl, test.jsonl, sft.jsonl, heldout.jsonl (and its two parts, "
                                   "heldout-templates.jsonl and heldout-gsm.jsonl) and manifest.json go")
    p.add_argument("--train", type=int, default=512, help="RL problems")
    p.add_argument("--test", type=int, default=96, help="in-distribution test problems")
    p.add_argument("--sft", type=int, default=200, help="worked solutions for SFT")
    p.add_argument("--heldout", type=int, default=96,
                   help="held-out problems: half the project's six templates, half gsm_symbolic templates "
                        f"{', '.join(map(str, HELDOUT_GSM_TEMPLATES))}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", default=",".join(f"{s.name}={s.weight:g}" for s in MIX), metavar="NAME=WEIGHT,...",
                   help="the generators' shares of train/test/sft (0 leaves one out); default %(default)s")


def parse_mix(text: str) -> tuple[Source, ...]:
    """--mix 'chain_sum=2,gsm_symbolic=0' -> MIX reweighted; raises ValueError naming the bad part."""
    known = {s.name: s for s in MIX}
    weights = {s.name: s.weight for s in MIX}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = part.partition("=")
        if name not in known:
            raise ValueError(f"--mix: {name!r} is not one of {', '.join(known)}")
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not weight >= 0:
            raise ValueError(f"--mix: {part!r}: expected NAME=WEIGHT with a weight >= 0")
        weights[name] = weight
    mix = tuple(Source(s.name, weights[s.name], s.config) for s in MIX if weights[s.name] > 0)
    if not mix:
        raise ValueError(f"--mix: {text!r} leaves no generator with a weight above 0")
    return mix


def run_data_command(args) -> int:
    from launcher.gymdata import make_gym_dataset
    try:
        mix = parse_mix(args.mix)
        paths = make_gym_dataset(args.out_dir, args.train, args.test, args.sft, args.heldout, seed=args.seed, mix=mix)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
