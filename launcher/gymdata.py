"""Train / SFT / test / held-out problems from reasoning-gym's procedural generators (no download).

The in-distribution mix (`MIX`) is what a 135M model can learn: short chains of + and -, small
expressions with precedence, counting animals' legs (a one-line word problem), and GSM8K-derived
`gsm_symbolic` templates as the stretch. The held-out split shares no generator or template with it:
this project's six templates (launcher.mathdata, no longer trained on) and the `gsm_symbolic` templates
in `HELDOUT_GSM_TEMPLATES` (every tenth of the library's usable ones, not picked by how the model does).

Every row records where it came from (`source`: the generator's name, `template`: the gsm_symbolic
template index or the mathdata template name) and the library's `metadata`, which its scorer reads
(policies.verify.gym_score). SFT responses are worked step by step: gsm_symbolic's own chain of thought,
and for the others steps computed here from the expression or the animals, each ending in \\boxed{}.
"""
from __future__ import annotations

import ast
import json
import operator
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from launcher.mathdata import generate_problems, sft_response
from policies.data.dataset import write_jsonl


@dataclass(frozen=True)
class Source:
    """One reasoning-gym generator in the mix: its name, its share of the problems, its config knobs."""
    name: str
    weight: float
    config: dict = field(default_factory=dict)


MIX: tuple[Source, ...] = (
    Source("chain_sum", 1.0, {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    # allow_parentheses picks the generator's path that evaluates with precedence (its other path does not)
    Source("basic_arithmetic", 1.0, {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2,
                                     "operators": ["+", "-", "*", "/"], "allow_parentheses": True,
                                     "allow_negation": False, "format_style": "natural"}),
    Source("leg_counting", 1.0, {"min_animals": 1, "max_animals": 3, "min_instances": 1, "max_instances": 6}),
    Source("gsm_symbolic", 1.0),
)
# every tenth template id of gsm_symbolic's usable ones (its tasks_ok; 85 of them): 9 templates
HELDOUT_GSM_TEMPLATES: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80)
SEED_STRIDE = 10_000_000   # reasoning-gym seeds entry i with Random(seed + i): keep the seeds' streams apart
GSM_SIZE = 200_000         # gsm_symbolic draws its template list up front, this long


def _plain(value):
    """The metadata as JSON has it (tuples as lists; anything else odd as text), as the row will be read."""
    return json.loads(json.dumps(value, default=str))


# ---- worked solutions -------------------------------------------------------------------------------
_OPS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
        ast.Div: ("/", operator.truediv)}


class NotWorkable(ValueError):
    """An expression whose steps are not whole numbers (or not + - * /): no faithful worked solution."""


def _num(node: ast.AST) -> int | None:
    """The integer a node is (a constant or a negated one), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _num(node.operand)
        return None if inner is None else -inner
    return None


def _reduce_one(node: ast.AST) -> tuple[ast.AST, str | None]:
    """Apply the first operation (in evaluation order) whose operands are both numbers: (new node, 'a op b = c')."""
    if _num(node) is not None:
        return ast.Constant(_num(node)), None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner, step = _reduce_one(node.operand)
        return ast.UnaryOp(ast.USub(), inner), step
    if not isinstance(node, ast.BinOp) or type(node.op) not in _OPS:
        raise NotWorkable(f"not + - * /: {ast.unparse(node)}")
    a, b = _num(node.left), _num(node.right)
    if a is not None and b is not None:
        sym, fn = _OPS[type(node.op)]
        if sym == "/" and b == 0:
            raise NotWorkable("division by zero")
        value = fn(Fraction(a), Fraction(b))
        if value.denominator != 1:
            raise NotWorkable(f"{a} / {b} is not a whole number")
        shown_b = f"({b})" if b < 0 else str(b)
        return ast.Constant(int(value)), f"{a} {sym} {shown_b} = {int(value)}"
    if a is None:
        left, step = _reduce_one(node.left)
        return ast.BinOp(left, node.op, node.right), step
    right, step = _reduce_one(node.right)
    return ast.BinOp(node.left, node.op, right), step


def arithmetic_steps(expression: str) -> tuple[list[str], int]:
    """The lines of a worked evaluation of `expression` (one operation each, precedence respected) and its value."""
    try:
        node = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError as e:
        raise NotWorkable(f"cannot parse {expression!r}: {e.msg}") from None
    lines = []
    while _num(node) is None:
        node, step = _reduce_one(node)
        node = ast.Constant(_num(node)) if _num(node) is not None else node
        rest = ast.unparse(node)
        lines.append(step if _num(node) is not None else f"{step}, so we have {rest}")
    return lines, _num(node)


def _boxed(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def worked_solution(source: str, entry: dict) -> str:
    """A step-by-step response to a reasoning-gym entry, ending in \\boxed{answer}; NotWorkable if none is faithful."""
    md, answer = entry["metadata"], str(entry["answer"])
    if source in ("chain_sum", "basic_arithmetic"):
        lines, value = arithmetic_steps(md["expression"])
        if str(value) != answer:
            raise NotWorkable(f"{md['expression']} is {value}, the entry says {answer}")
        head = "We work out one operation at a time, multiplication and division before addition and subtraction:"
        return "\n".join([head if source == "basic_arithmetic" else "From left to right:", *lines, _boxed(answer)])
    if source == "leg_counting":
        from reasoning_gym.arithmetic.leg_counting import ANIMALS
        lines, terms = [], []
        for animal, count in md["animals"].items():
            legs = ANIMALS[animal]
            lines.append(f"A {animal} has {legs} legs, so {count} {animal}{'s have' if count > 1 else ' has'} "
                         f"{count} * {legs} = {count * legs} legs.")
            terms.append(count * legs)
        if sum(terms) != int(answer):
            raise NotWorkable(f"the legs add up to {sum(terms)}, the entry says {answer}")
        if len(terms) > 1:
            lines.append(f"In total: {' + '.join(map(str, terms))} = {sum(terms)} legs.")
        return "\n".join([*lines, _boxed(answer)])
    if source == "gsm_symbolic":
        cot = re.sub(r"\n?####[^\n]*\s*$", "", md["answer_cot"]).strip()
        return f"{cot}\n{_boxed(answer)}"
    raise NotWorkable(f"no worked solutions for {source!r}")


# ---- rows -------------------------------------------------------------------------------------------
def gym_rows(source: Source, seed: int, templates: frozenset[int] | None = None) -> Iterator[dict]:
    """Endless rows of one generator, the same for the same seed: prompt, answer, source, template,
    metadata, response. For gsm_symbolic only the `templates` given (None: all but the held-out ones).
    Entries without a faithful worked solution are skipped."""
    import reasoning_gym
    gsm = source.name == "gsm_symbolic"
    size = GSM_SIZE if gsm else SEED_STRIDE
    ds = reasoning_gym.create_dataset(source.name, seed=seed * SEED_STRIDE, size=size, **source.config)
    if gsm and templates is None:
        templates = frozenset(ds.task_indices) - frozenset(HELDOUT_GSM_TEMPLATES)
    for idx in range(size):
        template = ds.task_indices[idx] if gsm else None
        if gsm and template not in templates:
            continue
        entry = ds[idx]
        try:
            response = worked_solution(source.name, entry)
        except NotWorkable:
            continue
        yield {"prompt": entry["question"], "answer": str(entry["answer"]), "source": source.name,
               "template": template, "metadata": _plain(entry["metadata"]), "response": response}
    raise ValueError(f"{source.name}: ran out of entries after {size}")


def mixed_rows(n: int, mix: tuple[Source, ...], seed: int) -> list[dict]:
    """`n` rows with distinct prompts, each drawn from a generator of `mix` by its weight."""
    if not mix or any(s.weight < 0 for s in mix) or not sum(s.weight for s in mix) > 0:
        raise ValueError("the mix needs at least one source with a positive weight")
    rng = random.Random(seed)
    streams = {s.name: gym_rows(s, seed) for s in mix}
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        s = rng.choices(mix, weights=[m.weight for m in mix])[0]
        for _ in range(1000):
            row = next(streams[s.name])
            if row["prompt"] not in seen:
                break
        else:
            raise ValueError(f"{s.name}: 1000 repeated prompts in a row: its config makes too few distinct problems")
        seen.add(row["prompt"])
        out.append(row)
    return out


def heldout_rows(n: int, seed: int) -> list[dict]:
    """Half (rounded up) from the project's six templates, half from the held-out gsm_symbolic templates,
    alternating (so that the first N of the file, `eval --limit N`, hold both)."""
    ours = [{"prompt": p.question, "answer": str(p.answer), "source": "mathdata", "template": p.kind,
             "metadata": {"expr": p.expr, "steps": p.steps}, "response": sft_response(p)}
            for p in generate_problems((n + 1) // 2, seed)]
    gsm = gym_rows(Source("gsm_symbolic", 1.0), seed, frozenset(HELDOUT_GSM_TEMPLATES))
    theirs = [next(gsm) for _ in range(n // 2)]
    return [row for pair in zip(ours, theirs) for row in pair] + ours[len(theirs):]


def _problem(split: str, i: int, row: dict) -> dict:
    qid = f"{split}-{row['source']}-{i}" if split == "heldout" else f"{split}-{i}"
    return {"query_id": qid, "prompt": row["prompt"], "answer": row["answer"], "source": row["source"],
            "template": row["template"], "metadata": row["metadata"]}


def make_gym_dataset(out_dir: str | Path, n_train: int, n_test: int, n_sft: int = 200, n_heldout: int = 96, *,
                     seed: int = 0, mix: tuple[Source, ...] = MIX) -> dict[str, Path]:
    """Write train.jsonl, test.jsonl, heldout.jsonl (query_id, prompt, answer, source, template, metadata;
    the held-out parts also alone in heldout-templates.jsonl and heldout-gsm.jsonl),
    sft.jsonl (prompt, response, answer, source, template) and manifest.json (what made them).

    train, test and sft are cut from one pool of distinct prompts from `mix`; heldout shares no
    generator or template with them.
    """
    for name, n in (("train", n_train), ("test", n_test), ("sft", n_sft), ("heldout", n_heldout)):
        if n < 0:
            raise ValueError(f"--{name}: expected a count >= 0, got {n}")
    out = Path(out_dir)
    pool = mixed_rows(n_train + n_test + n_sft, mix, seed)
    train, test, sft = pool[:n_train], pool[n_train:n_train + n_test], pool[n_train + n_test:]
    held = [_problem("heldout", i, r) for i, r in enumerate(heldout_rows(n_heldout, seed))]
    paths = {
        "train": write_jsonl(out / "train.jsonl", (_problem("train", i, r) for i, r in enumerate(train))),
        "test": write_jsonl(out / "test.jsonl", (_problem("test", i, r) for i, r in enumerate(test))),
        "heldout": write_jsonl(out / "heldout.jsonl", held),
        # its two parts on their own, for a column each: the project's six templates, the gsm_symbolic ones
        "heldout-templates": write_jsonl(out / "heldout-templates.jsonl",
                                         (r for r in held if r["source"] == "mathdata")),
        "heldout-gsm": write_jsonl(out / "heldout-gsm.jsonl", (r for r in held if r["source"] == "gsm_symbolic")),
        "sft": write_jsonl(out / "sft.jsonl", ({"prompt": r["prompt"], "response": r["response"], "answer": r["answer"],
                                                "source": r["source"], "template": r["template"]} for r in sft)),
    }
    manifest = {"seed": seed, "mix": [{"name": s.name, "weight": s.weight, "config": s.config} for s in mix],
                "heldout": {"mathdata": "launcher/mathdata.py's six templates",
                            "gsm_symbolic_templates": list(HELDOUT_GSM_TEMPLATES)},
                "counts": {"train": n_train, "test": n_test, "sft": n_sft, "heldout": n_heldout}}
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=1) + "\n")
    return paths
