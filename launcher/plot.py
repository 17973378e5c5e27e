"""A one-page PNG of a run: reward, accuracy, truncation rate and throughput against the step.

``python -m launcher.plot RUN_DIR [OUT.png]``. Uses the Agg canvas directly, so it never needs a display
and never changes matplotlib's global backend for an embedding program.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from launcher.job.metrics import read_metrics

PANELS = (
    ("reward_mean", "reward (mean)"),
    ("accuracy", "accuracy"),
    ("truncation_rate", "truncation rate"),
    ("tokens_per_s", "throughput (tokens/s)"),
)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a finite number under `key`; a re-run step keeps its last value."""
    by_step: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's metrics plot (default `run_dir/metrics.png`) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out) if out is not None else run_dir / "metrics.png"
    fig = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, PANELS):
        steps, values = _series(records, key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if not steps:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        ax.plot(steps, values, marker="o" if len(steps) < 50 else None, markersize=3)
    fig.suptitle(f"{run_dir.name}: {len(records)} records")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2:
        print("usage: python -m launcher.plot RUN_DIR [OUT.png]", file=sys.stderr)
        return 2
    print(plot_run(argv[0], argv[1] if len(argv) > 1 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
