"""One progress line per training step: a user can tell slow from stuck at a glance."""
from __future__ import annotations

import time


def _fmt_duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, mode: str = ""):
        self.total, self.start = total_steps, start_step
        self.t0 = time.monotonic()
        self.mode = mode

    def line(self, m: dict) -> str:
        done = int(m["step"]) + 1
        elapsed = time.monotonic() - self.t0
        per_step = elapsed / max(1, done - self.start)
        eta = per_step * (self.total - done)
        tps = m.get("response_tokens", 0) / per_step if per_step else 0.0
        parts = [
            f"step {done}/{self.total}",
            f"reward {m.get('reward_mean', float('nan')):+.2f}",
            f"acc {m.get('accuracy', float('nan')):.3f}",
            f"trunc {m.get('truncation_rate', float('nan')):.2f}",
            f"gen {tps:.0f} tok/s",
            f"learn {m.get('learner_tokens_per_s', 0.0):.0f} tok/s",
            f"staleness {m.get('max_staleness_seen', 0)}",
            f"ETA {_fmt_duration(eta)}",
        ]
        return " | ".join(parts)

    def tokens_per_s(self, m: dict) -> float:
        done = int(m["step"]) + 1
        per_step = (time.monotonic() - self.t0) / max(1, done - self.start)
        return m.get("response_tokens", 0) / per_step if per_step else 0.0
