"""The progress line: its ETA is the time to the last step, or to the end of a time budget that comes first."""
import re
import time

from launcher.job.progress import Progress


def _after(progress: Progress, elapsed: float) -> Progress:
    progress.t0 = time.monotonic() - elapsed
    return progress


def _eta_seconds(line: str) -> int:
    m, s = re.search(r"ETA (\d+)m(\d+)s", line).groups()
    return 60 * int(m) + int(s)


def test_eta_counts_the_steps_left_at_the_pace_so_far():
    line = _after(Progress(total_steps=10), elapsed=20.0).line({"step": 1})  # 2 steps in 20 s
    assert "step 2/10" in line
    assert 79 <= _eta_seconds(line) <= 80  # 8 steps x 10 s
    assert "time budget" not in line


def test_a_time_budget_that_ends_first_bounds_the_eta():
    p = _after(Progress(total_steps=100, ends_at=time.monotonic() + 90.0), elapsed=20.0)
    line = p.line({"step": 1})  # 98 steps x 10 s = 16 min by the steps, but the budget ends in 90 s
    assert "(time budget)" in line
    assert 88 <= _eta_seconds(line) <= 90


def test_a_budget_that_ends_later_leaves_the_eta_to_the_steps():
    line = _after(Progress(total_steps=10, ends_at=time.monotonic() + 3600.0), elapsed=20.0).line({"step": 1})
    assert "time budget" not in line
    assert 79 <= _eta_seconds(line) <= 80


def test_a_spent_budget_reads_zero_not_negative():
    line = _after(Progress(total_steps=10, ends_at=time.monotonic() - 5.0), elapsed=20.0).line({"step": 1})
    assert "ETA 0m00s (time budget)" in line
