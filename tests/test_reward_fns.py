"""Users' reward functions: loading, weighted sums in the verifier pool, failures counted, never a hang."""
from __future__ import annotations

import asyncio
import textwrap
import time

import pytest

from launcher.config import ConfigError, load_config
from launcher.config.schema import check_reward_fns
from policies.verify.reward_fns import RewardFnError, boxed, load_reward_fn, weighted_reward
from policies.verify.verifier_pool import VerifierPool

USER_FNS = '''
import os, time

def length(prompt, response, reference, extra):
    return float(len(response))

def matches(prompt, response, reference, extra):
    return response.strip() == reference and extra.get("level") == "easy"

def boom(prompt, response, reference, extra):
    if response == "boom":
        raise KeyError("no such thing")
    return 0.0

def nan(prompt, response, reference, extra):
    return float("nan") if response == "nan" else "text" if response == "text" else 0.0

def slow(prompt, response, reference, extra):
    if response == "slow":
        time.sleep(60)
    return 0.0

def crash(prompt, response, reference, extra):
    if response == "crash":
        os._exit(3)
    return 0.0

def hog(prompt, response, reference, extra):
    if response == "hog":
        return len(bytearray(16 * 2**30))
    return 0.0

def wrong_args(prompt, response):
    return 0.0

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "user_rewards.py"
    p.write_text(textwrap.dedent(USER_FNS))
    return p


def test_load_by_file_or_module_and_bad_specs_are_named(user_file):
    assert load_reward_fn(f"{user_file}:length")("p", "abc", "r", {}) == 3.0
    assert load_reward_fn("policies.verify.reward_fns:boxed") is boxed
    for spec, why in [(f"{user_file}:missing", "has no attribute 'missing'"),
                      (f"{user_file}:NOT_A_FUNCTION", "is a int, not a function"),
                      (f"{user_file}:wrong_args", r"must take \(prompt, response, reference, extra\)"),
                      ("no_such_pkg_xyz.mod:fn", "cannot import 'no_such_pkg_xyz.mod': ModuleNotFoundError"),
                      ("/nowhere/r.py:fn", "no such file")]:
        with pytest.raises(RewardFnError, match=why):
            load_reward_fn(spec)


def test_weighted_sum_and_non_numbers():
    fns = [(lambda p, r, ref, e: 2.0, 0.5), (lambda p, r, ref, e: True, -3.0)]
    assert weighted_reward(fns, "p", "r", "ref", {}) == 1.0 - 3.0
    with pytest.raises(ValueError, match="returned None, expected a finite number"):
        weighted_reward([(lambda p, r, ref, e: None, 1.0)], "p", "r", "ref", {})
    assert boxed("", "so \\boxed{4}", "4", {}) == 1.0 and boxed("", "4", "4", {}) == 0.0


def test_an_unimportable_function_is_a_config_error_naming_the_key(user_file):
    cfg = load_config(overrides=[f"reward.fns=[{{fn: '{user_file}:length'}}, {{fn: 'nope_pkg.m:f', weight: 2}}]"])
    with pytest.raises(ConfigError, match=r"^reward\.fns\[1\]\.fn: 'nope_pkg.m:f': cannot import"):
        check_reward_fns(cfg)
    with pytest.raises(ConfigError, match=r"reward\.fns\[0\]\.fn: expected a string 'package.module:function'"):
        load_config(overrides=["reward.fns=[{fn: no_colon}]"])


def test_pool_runs_user_functions_and_survives_every_failure(user_file):
    specs = [(f"{user_file}:{name}", w) for name, w in
             [("length", 0.5), ("matches", 10.0), ("boom", 1.0), ("nan", 1.0), ("slow", 1.0), ("crash", 1.0),
              ("hog", 1.0)]]
    responses = ["42", "boom", "nan", "text", "slow", "crash", "hog", "4"]
    extras = [{"level": "easy"}] * len(responses)

    async def go():
        async with VerifierPool(workers=1, timeout=1.0, reward_fns=specs, memory_limit_mb=2048) as pool:
            t0 = time.monotonic()
            out = await pool.rewards(["q"] * len(responses), responses, ["42"] * len(responses), extras)
            return out, time.monotonic() - t0, pool.stats
    out, took, stats = asyncio.run(go())
    assert out[0].value == pytest.approx(0.5 * 2 + 10.0) and out[0].error is None
    assert out[-1].value == pytest.approx(0.5 * 1) and out[-1].error is None
    assert "KeyError: 'no such thing'" in out[1].error
    assert "returned nan" in out[2].error and "returned 'text'" in out[3].error
    assert "timeout" in out[4].error
    assert "worker process died" in out[5].error
    assert "MemoryError" in out[6].error
    assert [o.value for o in out[1:7]] == [None] * 6
    assert stats.crashes == 1 and stats.timeouts == 1 and stats.respawns >= 1
    assert took < 15
