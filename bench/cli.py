"""The command line the generation and RL-step benchmarks share: the script's docstring as its help, and
the flags each of them has (responses per prompt, repetitions, torch threads) declared once."""
from __future__ import annotations

import argparse


def bench_parser(doc: str | None, *, samples: int, repeats: int, threads: int) -> argparse.ArgumentParser:
    """A parser with --samples, --repeats and --threads at these defaults; the script adds its own flags."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=samples, help="responses per prompt (G)")
    ap.add_argument("--repeats", type=int, default=repeats, help="runs of each measurement")
    ap.add_argument("--threads", type=int, default=threads, help="torch threads")
    return ap
