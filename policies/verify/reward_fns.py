"""Users' reward functions: ``reward.fns: [{fn: "package.module:function", weight: 1.0}, ...]``.

A reward function is a plain Python function::

    def my_reward(prompt: str, response: str, reference: str, extra: dict) -> float

`reference` is the row's reference answer (a list of them when it has several), `extra` the row's
other columns (policies.data.dataset.Problem.extra). `fn` names it as ``package.module:function`` (importable
where the verifier runs) or ``path/to/file.py:function``. The verifier's process pool
(policies.verify.verifier_pool) runs them under its timeout, memory limit and kill; the response's reward is
the weighted sum. A function that raises, or returns something that is not a finite number, fails
that response: it gets `reward.on_error` and the failure is counted in the step's `reward_errors`.

`boxed` is the built-in check as a function (1.0 when the last \\boxed{} matches the reference, else
0.0), for mixing the usual verdict with one's own terms; `policies.verify.gym_score:reasoning_gym` is
reasoning-gym's own scorers as one (+1 / -1), for rows `python -m launcher data` wrote.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable

RewardCallable = Callable[[str, str, str, dict], Any]


class RewardFnError(ValueError):
    """A `reward.fns[i].fn` that cannot be used; the message says why (the caller adds the key)."""


def is_file_spec(spec: str) -> bool:
    module = spec.rpartition(":")[0]
    return module.endswith(".py") or "/" in module or "\\" in module


def parse_spec(spec: str) -> tuple[str, str]:
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise RewardFnError(f"expected 'package.module:function' or 'path/to/file.py:function', got {spec!r}")
    return module, name


def import_function(spec: str, prefix: str = "boba_reward") -> Callable:
    """The callable ``spec`` names (``package.module:function`` or ``path/to/file.py:function``); a file is
    loaded once as module ``<prefix>_<hash>``. Raises RewardFnError saying why not (users' workflows too)."""
    module_name, name = parse_spec(spec)
    try:
        if is_file_spec(spec):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise RewardFnError(f"{spec!r}: no such file {str(path)!r}")
            mod_id = f"{prefix}_{abs(hash(str(path.resolve()))):x}"
            module = sys.modules.get(mod_id)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_id, path)
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[mod_id] = module
        else:
            module = importlib.import_module(module_name)
    except RewardFnError:
        raise
    except Exception as e:
        raise RewardFnError(f"{spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardFnError(f"{spec!r}: {module_name!r} has no attribute {name!r}")
    if not callable(fn):
        raise RewardFnError(f"{spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def load_reward_fn(spec: str) -> RewardCallable:
    """Import the function `spec` names and check it takes (prompt, response, reference, extra)."""
    fn = import_function(spec)
    try:
        inspect.signature(fn).bind("prompt", "response", "reference", {})
    except TypeError as e:
        raise RewardFnError(f"{spec!r}: must take (prompt, response, reference, extra): {e}") from None
    except ValueError:
        pass  # a builtin without a signature: trust it
    return fn


def weighted_reward(fns: list[tuple[RewardCallable, float]], prompt: str, response: str, reference: Any,
                    extra: dict) -> float:
    """sum(weight * fn(...)); raises ValueError naming the function when one returns no finite number."""
    total = 0.0
    for fn, weight in fns:
        value = fn(prompt, response, reference, extra)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{getattr(fn, '__qualname__', fn)} returned {value!r:.80}, expected a finite number")
        total += weight * float(value)
    return total


def boxed(prompt: str, response: str, reference: str, extra: dict) -> float:
    """1.0 when the response's last \\boxed{} answer matches the reference, else 0.0."""
    from policies.verify.math_equal import is_correct
    return 1.0 if is_correct(response, reference) else 0.0
