"""Training metrics: one JSON line per record in `run_dir/metrics.jsonl`, scalars also to TensorBoard.

The JSONL file is the source of truth (plots and tests read it); TensorBoard is for watching a run.
A crash mid-write leaves at most one unterminated last line: the reader skips it, the writer moves it
to `metrics.jsonl.partial` before appending, so later records never land on a broken line.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import orjson

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsError(ValueError):
    """A corrupt metrics file; the message names file:line."""


def _plain(value: Any) -> Any:
    """JSON-able value: tensors / numpy scalars become Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _scalars(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a (nested) record, with '/'-joined names, for TensorBoard."""
    out = []
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _scalars(v, name + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((name, float(v)))
    return out


def _salvage_partial_line(path: Path) -> None:
    """Move an unterminated last line (a crash mid-write) aside, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        partial = data[cut:]
        with open(path.with_name(path.name + ".partial"), "ab") as side:
            side.write(partial + b"\n")
        f.truncate(cut)
    log.warning("%s: moved an unterminated last line (%d bytes) to %s.partial", path, len(partial), path.name)


def open_wandb(options: Mapping[str, Any], run_dir: Path):
    """A W&B run (`logging.wandb`): wandb is optional, imported only when asked for; mode "offline" writes
    under run_dir/wandb and needs no network (`wandb sync` uploads it later)."""
    try:
        import wandb
    except ImportError as e:
        raise MetricsError(f"logging.wandb: needs the wandb package (pip install wandb): {e}") from None
    return wandb.init(project=options.get("project"), name=options.get("name"), mode=options.get("mode", "offline"),
                      dir=str(run_dir), config=options.get("config"))


class MetricsWriter:
    """Append metrics records to `run_dir/metrics.jsonl`, scalars to `run_dir/tb` and, with `wandb`
    (options: project, name, mode, config), to a W&B run."""

    def __init__(self, run_dir: str | Path, *, fsync: bool = False, tensorboard: bool = True,
                 wandb: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        _salvage_partial_line(self.path)
        self._fsync = fsync
        self._file = open(self.path, "ab")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter   # slow import; only when wanted
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self._wandb = open_wandb(wandb, self.run_dir) if wandb else None

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        if self._file.closed:
            raise RuntimeError(f"{self.path}: MetricsWriter is closed")
        clash = {"step", "time"} & set(metrics)
        if clash:
            raise ValueError(f"metrics may not use the reserved keys {sorted(clash)}")
        record = {"step": int(step), "time": time.time(), **_plain(dict(metrics))}
        try:
            line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
        except TypeError as e:
            raise ValueError(f"metrics at step {step} are not JSON-serialisable: {e}") from None
        self._file.write(line + b"\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        if self._tb is not None:
            for name, value in _scalars(record):
                if name not in ("step", "time"):
                    self._tb.add_scalar(name, value, global_step=int(step), walltime=record["time"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({n: v for n, v in _scalars(record) if n not in ("step", "time")}, step=int(step))
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run, in write order; [] if none yet. An unterminated last line is skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetricsError(f"{run_dir}: no such run directory")
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last_unterminated = i == len(lines)     # split leaves b"" last when the file ends in "\n"
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            if last_unterminated:
                log.warning("%s:%d: skipping an unterminated last line (a crash mid-write?)", path, i)
                break
            raise MetricsError(f"{path}:{i}: not valid JSON: {e}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise MetricsError(f"{path}:{i}: expected an object with an integer 'step', got {line[:80]!r}")
        records.append(rec)
    return records
