"""The learner's exactly-once record, on disk: `RUN_DIR/trained.jsonl`, one line per trained step.

Each line is the step's metrics record (step, version, the query id of every trained sequence, the
statistics).  Keeping every step in memory grew without bound (at 8,192 sequences a step the learner
state passed the bus's 16 MiB message limit after ~160 steps), so memory holds only the last
`window` steps and the file holds all of them, exactly once each:

* steps are appended in order, so the record is the contiguous range [first_step, next_step) and a
  step trained twice is detected however old it is (`record` raises naming the step and the file);
* a learner that starts at step s (a resume, or a restart from a checkpoint) drops the lines of
  steps >= s: the weights they describe were rolled back, and those steps are trained again;
* a crash mid-append leaves an unterminated last line, which is dropped the same way.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

TRAINED_FILE = "trained.jsonl"


class TrainedLogError(ValueError):
    """The record would hold a step twice or skip one; names the step and the file."""


def read_trained(run_dir: str | Path) -> list[dict]:
    """Every step's record of a run, in step order ([] when none); an unterminated last line is skipped."""
    path = Path(run_dir) / TRAINED_FILE
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # a crash mid-append
    return [json.loads(line) for line in lines if line.strip()]


class TrainedLog:
    """Append-only record of trained steps, the last `window` of them also in memory."""

    def __init__(self, run_dir: str | Path, start_step: int, window: int = 16):
        self.path = Path(run_dir) / TRAINED_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_trained(run_dir) if r["step"] < start_step]
        self._rewrite(kept)
        self.first_step = kept[0]["step"] if kept else start_step
        self.next_step = start_step
        self.recent: collections.deque[dict] = collections.deque(kept[-window:], maxlen=window)

    def _rewrite(self, records: list[dict]) -> None:
        """Keep only `records` (atomically), unless the file already holds exactly them."""
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        if self.path.exists() and self.path.read_text() == text:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def record(self, record: dict) -> None:
        """Append one step's record (it must carry `step` and `qids`) and fsync it."""
        step = record["step"]
        if step != self.next_step:
            what = "already recorded" if step < self.next_step else f"skips steps {self.next_step}..{step - 1}"
            raise TrainedLogError(f"{self.path}: step {step} {what} (the record holds steps "
                                  f"{self.first_step}..{self.next_step - 1})")
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.next_step = step + 1
        self.recent.append(record)

    def since(self, step: int, limit: int) -> list[dict]:
        """At most `limit` records of steps >= step, from memory when it still holds them, else the file."""
        if self.recent and step >= self.recent[0]["step"]:
            found = [r for r in self.recent if r["step"] >= step]
        else:
            found = [r for r in read_trained(self.path.parent) if r["step"] >= step]
        return found[:limit]
