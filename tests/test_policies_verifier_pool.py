"""The verifier pool: real worker processes, deadlines, kills and respawns."""

import asyncio
import os
import signal
import time

import pytest

from policies.verify.verifier import VerifierPool, is_correct

TIMEOUT = 1.0


def B(ans: str) -> str:
    return "Reasoning... so the answer is \\boxed{" + ans + "}."


NORMAL = [
    (B("\\frac{1}{2}"), "0.5", True),
    (B("0.6"), "\\frac{1}{2}", False),
    (B("[1,2]"), "[1,2)", False),
    (B("\\{2,1\\}"), "\\{1,2\\}", True),
    (B("1,000"), "1000", True),
    (B("-3"), "3", False),
    (B("x^2+1"), "1+x^2", True),
    (B("\\text{Monday}"), "monday", True),
    ("no box at all", "7", False),
]

PATHOLOGICAL = [
    B("9^{9^{9^{9^{9}}}}"),  # refused by the tower guard
    B("{" * 10_000 + "1" + "}" * 10_000),  # refused by the nesting guard
    B("1" * 1_000_000),  # a megabyte answer, refused by length
    "x" * 1_000_000,  # a megabyte response with no box
    B("(10^{20})!"),  # passes the guards, hangs sympy in C: the worker is killed
    B("\\binom{10^{30}}{10^{15}}"),  # same
    B("\\frac{" * 30 + "1" + "}{2}" * 30),  # slow pure-Python parse: interrupted in the worker
]


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout=TIMEOUT) as p:
        p.wait_ready()
        yield p


def test_pool_agrees_with_in_process_check(pool):
    responses, refs, expected = zip(*NORMAL)
    assert pool.score_sync(list(responses), list(refs)) == list(expected)
    assert [is_correct(r, g) for r, g in zip(responses, refs)] == list(expected)


@pytest.mark.parametrize("response", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answer_costs_at_most_the_timeout(pool, response):
    t0 = time.monotonic()
    assert pool.score_sync([response], ["5"]) == [False]
    assert time.monotonic() - t0 < 2.5 * TIMEOUT
    # the pool still answers, and correctly
    responses, refs, expected = zip(*NORMAL)
    assert pool.score_sync(list(responses), list(refs)) == list(expected)


def test_slow_python_work_is_interrupted_without_a_respawn(pool):
    before = pool.stats
    assert pool.score_sync([B("(10^{20})!")], ["1"]) == [False]
    after = pool.stats
    assert after.timeouts == before.timeouts + 1
    assert after.respawns == before.respawns


def test_a_worker_past_the_deadline_is_killed_and_counted():
    """Without the in-worker interrupt (as for work stuck in C), the kill bounds the answer."""
    with VerifierPool(workers=1, timeout=TIMEOUT, interrupt_at=None) as p:
        assert p.score_sync([B("2")], ["2"]) == [True]
        pids = p.worker_pids()
        t0 = time.monotonic()
        assert p.score_sync([B("(10^{20})!"), B("3")], ["1", "3"]) == [False, True]
        assert time.monotonic() - t0 < 2.5 * TIMEOUT
        assert p.stats.timeouts == 1 and p.stats.respawns == 1
        assert p.worker_pids() != pids


def test_a_frozen_worker_is_replaced(pool):
    """A worker that stops responding (SIGSTOP) loses only its current answer."""
    n = 40
    responses = [B(f"{i}") for i in range(n)]
    refs = [str(i) for i in range(n)]
    pool.wait_ready()
    victim = pool.worker_pids()[0]
    before = pool.stats
    os.kill(victim, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = pool.score_sync(responses, refs)
        assert time.monotonic() - t0 < 3 * TIMEOUT
    finally:
        if victim in pool.worker_pids():
            os.kill(victim, signal.SIGCONT)
    assert victim not in pool.worker_pids()
    assert len(out) == n and out.count(False) <= 1
    assert pool.stats.respawns == before.respawns + 1
    assert pool.stats.timeouts == before.timeouts + 1


async def test_sigkill_mid_batch_loses_nothing(pool):
    # distinct symbolic answers, so the batch runs for a while on both workers
    n = 60
    responses = [B(f"x^2+{i}x+{i + 1}") for i in range(n)]
    refs = [f"{i + 1}+{i}x+x^2" for i in range(n)]
    pool.wait_ready()
    before = pool.stats
    task = asyncio.ensure_future(pool.score(responses, refs))
    while pool.stats.answered < before.answered + 10:
        await asyncio.sleep(0.005)
    assert not task.done()
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    out = await asyncio.wait_for(task, timeout=60)
    after = pool.stats
    assert len(out) == n
    assert after.respawns == before.respawns + 1
    # only the answer the killed worker was on may be lost (counted wrong); the rest come back right
    lost = out.count(False)
    assert lost == after.crashes - before.crashes == 1
    assert after.answered == before.answered + n


async def test_adversarial_flood_completes_with_normal_answers_right(pool):
    adversarial = [
        B("9^{9^{9^{9}}}"),
        B("{" * 5000 + "}" * 5000),
        B("2" * 50_000),
        B("1+" * 2000),
        B("\\frac{" * 60 + "1" + "}{2}" * 60),
        "\\boxed{" * 1000,
        B("99999!"),
    ]
    slow = [B("(10^{20})!"), B("\\binom{10^{30}}{10^{15}}")]  # each costs a full timeout
    responses, refs, expected = [], [], []
    for i in range(1000):
        responses.append(adversarial[i % len(adversarial)] if i % 250 else slow[(i // 250) % 2])
        refs.append("5")
        expected.append(False)
        ok, ref, want = NORMAL[i % len(NORMAL)]
        responses.append(ok)
        refs.append(ref)
        expected.append(want)
    t0 = time.monotonic()
    out = await pool.score(responses, refs)
    elapsed = time.monotonic() - t0
    assert out == expected
    assert elapsed < 30  # 4 kills at 1 s each plus 2,000 cheap answers


async def test_concurrent_score_calls_keep_their_own_results(pool):
    batches = [[B(str(k * 100 + i)) for i in range(30)] for k in range(4)]
    refs = [[str(k * 100 + i + (i % 3 == 0)) for i in range(30)] for k in range(4)]
    outs = await asyncio.gather(*(pool.score(b, r) for b, r in zip(batches, refs)))
    for out in outs:
        assert out == [i % 3 != 0 for i in range(30)]


def test_a_worker_killed_while_starting_is_replaced():
    with VerifierPool(workers=1, timeout=TIMEOUT) as p:
        os.kill(p.worker_pids()[0], signal.SIGKILL)
        assert p.score_sync([B("4"), B("5")], ["4", "4"]) == [True, False]
        assert p.stats.respawns == 1


async def test_empty_batch(pool):
    assert await pool.score([], []) == []


def test_bad_inputs_are_named(pool):
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        pool.score_sync(["a", "b"], ["1"])
    with pytest.raises(TypeError, match=r"responses\[1\] must be str"):
        pool.score_sync(["a", None], ["1", "2"])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        pool.score_sync(["a"], [3])
    with pytest.raises(TypeError, match="not a single str"):
        pool.score_sync("abc", "abc")


def test_constructor_validation_and_defaults():
    with pytest.raises(ValueError, match="workers"):
        VerifierPool(workers=0)
    with pytest.raises(ValueError, match="timeout"):
        VerifierPool(workers=1, timeout=0)
    with pytest.raises(ValueError, match="fork"):
        VerifierPool(workers=1, start_method="fork")
    p = VerifierPool(timeout=TIMEOUT)
    try:
        assert p.workers == min(4, os.cpu_count())
    finally:
        p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.score_sync([B("1")], ["1"])


async def test_async_context_manager_closes_workers():
    async with VerifierPool(workers=1, timeout=TIMEOUT) as p:
        assert await p.score([B("2"), B("3")], ["2", "2"]) == [True, False]
        pids = p.worker_pids()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
