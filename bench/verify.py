"""Answers verified per second: VerifierPool vs one process, clean and adversarial.

    .venv/bin/python bench/verify.py [--n 2000] [--workers 2] [--adversarial 1000]

Builds a realistic batch (G responses per problem, ~1.5 KB of reasoning before the
box, about half right, a few cut off with no box) over many answer kinds, grades
it sequentially with ``is_correct`` in this process (the baseline), then with the
pool, and prints both rates and their ratio. Then mixes in adversarial answers
(power towers, deep nesting, megabyte strings, slow-to-parse LaTeX) and prints the
pool's rate on that mix; the sequential baseline cannot run it (an answer that
hangs sympy would hang this process).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.verify.verifier import VerifierPool, is_correct  # noqa: E402

# (reference, right answers, wrong answers)
KINDS = [
    ("{n}", ["{n}", "{n}.0", "\\text{{{n}}}"], ["{m}", "-{n}"]),
    ("\\frac{{{n}}}{{{d}}}", ["\\dfrac{{{n}}}{{{d}}}", "{n}/{d}"], ["\\frac{{{d}}}{{{n}}}", "\\frac{{{n}}}{{{m}}}"]),
    ("\\frac{{1}}{{4}}", ["0.25", "\\tfrac14"], ["0.24", "\\frac{{1}}{{5}}"]),
    ("{n}\\sqrt{{2}}", ["\\sqrt{{{n2x2}}}", "{n}\\sqrt2"], ["{n}\\sqrt{{3}}", "\\sqrt{{{n}}}"]),
    ("[{a}, {b})", ["[{a},{b})", "\\left[{a}, {b}\\right)"], ["[{a},{b}]", "({a},{b})"]),
    ("\\{{{a}, {b}\\}}", ["\\{{{b},{a}\\}}"], ["\\{{{a},{m}\\}}"]),
    ("({a}, {b})", ["\\left({a},{b}\\right)"], ["({b},{a})"]),
    (
        "\\begin{{pmatrix}}{a}&{b}\\\\{n}&{d}\\end{{pmatrix}}",
        ["\\begin{{bmatrix}}{a}&{b}\\\\{n}&{d}\\end{{bmatrix}}"],
        ["\\begin{{pmatrix}}{a}&{b}\\\\{n}&{m}\\end{{pmatrix}}"],
    ),
    ("x^2+{a}x+{b}", ["{b}+{a}x+x^2", "x^{{2}}+{a}x+{b}"], ["x^2+{b}x+{a}", "x^2-{a}x+{b}"]),
    ("{n}\\%", ["{n}", "{n}\\%"], ["{m}\\%"]),
    ("{n}^\\circ", ["{n}", "{n}^{{\\circ}}"], ["{m}^\\circ"]),
    ("{n}", ["{n}\\text{{ cm}}", "{n} dollars", "\\${n}"], ["{m}\\text{{ cm}}"]),
    ("{big}", ["{big_commas}"], ["{big_off}"]),
    ("\\text{{{word}}}", ["{word}", "\\text{{{Word}}}"], ["{other}"]),
    ("-{n}", ["-{n}"], ["{n}"]),
]
WORDS = ["monday", "blue", "even", "north", "yes", "triangle", "east", "odd"]
FILLER = (
    "We set up the equation carefully. Let $x$ be the unknown; then $2x + 3 = {n}$ and so "
    "$x = \\frac{{{n} - 3}}{{2}}$. Checking the boundary cases, the sum $\\sum_{{k=1}}^{{{d}}} k$ "
    "equals $\\frac{{{d}({d}+1)}}{{2}}$. "
)

ADVERSARIAL = [
    "9^{{9^{{9^{{9^{{9}}}}}}}}",
    "{{" * 10000 + "1" + "}}" * 10000,
    "1" * 1_000_000,
    "x" * 1500,
    "7" * 1999,  # one long number: passes the guards, cheap to compare
    "\\int_0^1 \\sum_{{k}} \\frac{{x^k}}{{k!}}\\, dx \\cdot " * 6,  # LaTeX noise that reaches sympy
    "(" * 60 + "1" + ")" * 60,
    "10^{{10^{{10}}}}",
    "99999!",
    "1+" * 900 + "1",
]
SLOW = ["\\frac{{" * 30 + "1" + "}}{{2}}" * 30, "(10^{{20}})!"]  # reach the per-answer timeout


def realistic(n_answers: int, group: int, rng: random.Random) -> tuple[list[str], list[str]]:
    responses, refs = [], []
    while len(responses) < n_answers:
        ref_t, rights, wrongs = rng.choice(KINDS)
        v = _values(rng)
        ref = ref_t.format(**v)
        for _ in range(min(group, n_answers - len(responses))):
            reasoning = "".join(FILLER.format(**_values(rng)) for _ in range(rng.randint(4, 8)))
            roll = rng.random()
            if roll < 0.05:
                responses.append(reasoning)  # cut off before the box
            else:
                ans = rng.choice(rights if roll < 0.5 else wrongs).format(**v)
                responses.append(reasoning + "Therefore the answer is $\\boxed{" + ans + "}$.")
            refs.append(ref)
    return responses, refs


def _values(rng: random.Random) -> dict:
    n, d = rng.randint(2, 99), rng.randint(2, 99)
    big = rng.randint(1000, 9_999_999)
    word = rng.choice(WORDS)
    return dict(
        n=n, d=d, m=n + rng.randint(1, 9), a=rng.randint(-9, 9), b=rng.randint(10, 20),
        n2x2=2 * n * n, big=big, big_commas=f"{big:,}", big_off=f"{big + 1000:,}",
        word=word, Word=word.capitalize(), other=rng.choice([w for w in WORDS if w != word]),
    )


def adversarial(n: int, slow_every: int) -> list[str]:
    out = []
    for i in range(n):
        kind = SLOW[(i // slow_every) % len(SLOW)] if slow_every and i % slow_every == 0 else ADVERSARIAL[i % len(ADVERSARIAL)]
        out.append("Hmm. \\boxed{" + kind.format() + "}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="realistic answers")
    ap.add_argument("--group", type=int, default=16, help="responses per problem (share a reference)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=2.0, help="per-answer seconds in the pool")
    ap.add_argument("--adversarial", type=int, default=1000, help="adversarial answers mixed in")
    ap.add_argument("--slow-every", type=int, default=100, help="1 in this many adversarial answers hits the timeout")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    responses, refs = realistic(args.n, args.group, rng)
    print(f"cpu_count={os.cpu_count()}  workers={args.workers}  timeout={args.timeout}s  answers={len(responses)}")

    is_correct("\\boxed{1}", "1")  # import and warm the parser, as the pool's workers do
    t0 = time.perf_counter()
    seq = [is_correct(r, g) for r, g in zip(responses, refs)]
    t_seq = time.perf_counter() - t0
    rate_seq = len(responses) / t_seq
    print(f"sequential (1 process):   {rate_seq:8.1f} answers/s  ({t_seq:.2f} s, {sum(seq)} correct)")

    with VerifierPool(workers=args.workers, timeout=args.timeout) as pool:
        pool.wait_ready()
        t0 = time.perf_counter()
        par = pool.score_sync(responses, refs)
        t_pool = time.perf_counter() - t0
        rate_pool = len(responses) / t_pool
        print(f"pool ({args.workers} workers):        {rate_pool:8.1f} answers/s  ({t_pool:.2f} s, {sum(par)} correct)")
        print(f"ratio pool/sequential:    {rate_pool / rate_seq:8.2f}x")
        mismatch = sum(a != b for a, b in zip(seq, par))
        print(f"pool vs sequential verdict mismatches: {mismatch}")

        bad = adversarial(args.adversarial, args.slow_every)
        mixed = [(r, g, i) for i, (r, g) in enumerate(zip(responses, refs))] + [(b, "5", -1) for b in bad]
        random.Random(args.seed + 1).shuffle(mixed)
        before = pool.stats
        t0 = time.perf_counter()
        out = pool.score_sync([m[0] for m in mixed], [m[1] for m in mixed])
        t_mix = time.perf_counter() - t0
        rate_mix = len(mixed) / t_mix
        normal_ok = all(o == seq[i] for o, (_, _, i) in zip(out, mixed) if i >= 0)
        adv_wrong = all(not o for o, (_, _, i) in zip(out, mixed) if i < 0)
        s = pool.stats
        print(
            f"adversarial mix ({len(responses)} normal + {len(bad)} adversarial): {rate_mix:8.1f} answers/s "
            f"({t_mix:.2f} s; {rate_mix / rate_pool:.2f}x the clean pool rate)"
        )
        print(
            f"  normal verdicts unchanged: {normal_ok}; adversarial all wrong: {adv_wrong}; "
            f"refused={s.refused - before.refused} timeouts={s.timeouts - before.timeouts} "
            f"respawns={s.respawns - before.respawns} crashes={s.crashes - before.crashes}"
        )


if __name__ == "__main__":
    main()
