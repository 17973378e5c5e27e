"""One progress line per training step: a user can tell slow from stuck at a glance."""
from __future__ import annotations

import time


def _fmt_duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, mode: str = "", ends_at: float | None = None):
        """`ends_at`: the time.monotonic() at which a time budget stops the run, if one does."""
        self.total, self.start = total_steps, start_step
        self.t0 = time.monotonic()
        self.mode = mode
        self.ends_at = ends_at

    def eta(self, done: int, per_step: float) -> str:
        """Time to the last step, or to the end of the time budget where that comes first."""
        eta = per_step * (self.total - done)
        left = None if self.ends_at is None else self.ends_at - time.monotonic()
        if left is not None and left < eta:
            return f"ETA {_fmt_duration(left)} (time budget)"
        return f"ETA {_fmt_duration(eta)}"

    def line(self, m: dict) -> str:
        done = int(m["step"]) + 1
        elapsed = time.monotonic() - self.t0
        per_step = elapsed / max(1, done - self.start)
        tps = m.get("response_tokens", 0) / per_step if per_step else 0.0
        parts = [
            f"step {done}/{self.total}",
            f"reward {m.get('reward_mean', float('nan')):+.2f}",
            f"acc {m.get('accuracy', float('nan')):.3f}",
            f"trunc {m.get('truncation_rate', float('nan')):.2f}",
            f"gen {tps:.0f} tok/s",
            f"learn {m.get('learner_tokens_per_s', 0.0):.0f} tok/s",
            f"staleness {m.get('max_staleness_seen', 0)}",
            self.eta(done, per_step),
        ]
        return " | ".join(parts)

    def tokens_per_s(self, m: dict) -> float:
        done = int(m["step"]) + 1
        per_step = (time.monotonic() - self.t0) / max(1, done - self.start)
        return m.get("response_tokens", 0) / per_step if per_step else 0.0
