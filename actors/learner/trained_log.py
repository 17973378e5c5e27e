"""The learner's exactly-once record, on disk: `RUN_DIR/trained.jsonl`, one line per trained step.

Each line is the step's metrics record (step, version, the query id of every trained sequence, the
statistics).  Keeping every step in memory grew without bound (at 8,192 sequences a step the learner
state passed the bus's 16 MiB message limit after ~160 steps), so memory holds only the last
`window` steps and the file holds all of them, exactly once each:

* steps are appended in order, so the record is the contiguous range [first_step, next_step) and a
  step trained twice is detected however old it is (`record` raises naming the step and the file);
* a learner that starts at step s (a resume, or a restart from a checkpoint) cuts the lines of
  steps >= s: the weights they describe were rolled back, and those steps are trained again;
* a crash mid-append leaves an unterminated last line, which is cut the same way;
* a step is written (`record`) before the checkpoint that includes it, but served to others
  (`since`, `recent`) only once `complete` adds what came after (the weight sync): a launcher that
  fetches a record must never get a half one in place of the publication still to come.  Records
  served from the file (older than the window) lack those weight-sync fields.
Lines begin with `{"step":N,` so a reader finds a step without parsing the (large) qid lists.
"""
from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

TRAINED_FILE = "trained.jsonl"
_STEP = re.compile(rb'\{"step":(\d+)[,}]')


class TrainedLogError(ValueError):
    """The record would hold a step twice or skip one; names the step and the file."""


def _step_of(line: bytes) -> int:
    m = _STEP.match(line)
    return int(m.group(1)) if m else int(json.loads(line)["step"])


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(step, line) of every complete line; stops at an unterminated last one (a crash mid-append)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            if line.strip():
                yield _step_of(line), line


def read_trained(run_dir: str | Path, since: int = 0, limit: int | None = None) -> list[dict]:
    """The records of steps >= since (at most `limit`), in step order; [] when there are none."""
    out = []
    for step, line in _lines(Path(run_dir) / TRAINED_FILE):
        if step >= since:
            out.append(json.loads(line))
            if limit is not None and len(out) >= limit:
                break
    return out


class TrainedLog:
    """Append-only record of trained steps, the last `window` of them also in memory."""

    def __init__(self, run_dir: str | Path, start_step: int, window: int = 16):
        self.path = Path(run_dir) / TRAINED_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept, first, tail = 0, None, collections.deque(maxlen=window)
        for step, line in _lines(self.path):
            if step >= start_step:
                break
            first = step if first is None else first
            kept += len(line)
            tail.append(line)
        if self.path.exists() and self.path.stat().st_size != kept:
            os.truncate(self.path, kept)  # rolled-back steps and a torn last line
        self.first_step = start_step if first is None else first
        self.next_step = start_step
        self.complete_next = start_step  # steps below this are complete: served to others
        self.recent: collections.deque[dict] = collections.deque((json.loads(x) for x in tail), maxlen=window)

    def record(self, record: dict) -> None:
        """Append one step's record (it must carry `step` and `qids`) and fsync it."""
        step = record["step"]
        if step != self.next_step:
            what = "already recorded" if step < self.next_step else f"skips steps {self.next_step}..{step - 1}"
            raise TrainedLogError(f"{self.path}: step {step} {what} (the record holds steps "
                                  f"{self.first_step}..{self.next_step - 1})")
        line = json.dumps({"step": step, **record}, separators=(",", ":")) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.next_step = step + 1

    def complete(self, record: dict) -> None:
        """The step's record is final (published): keep it in memory and serve it."""
        self.recent.append(record)
        self.complete_next = record["step"] + 1

    def since(self, step: int, limit: int) -> list[dict]:
        """At most `limit` records of steps >= step, from memory when it still holds them, else the file."""
        if self.recent and step >= self.recent[0]["step"]:
            return [r for r in self.recent if r["step"] >= step][:limit]
        return [r for r in read_trained(self.path.parent, since=step, limit=limit) if r["step"] < self.complete_next]
