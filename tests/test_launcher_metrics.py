from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import torch

from launcher.job.metrics import MetricsError, MetricsWriter, read_metrics
from launcher.plot import plot_run


def test_writer_appends_json_lines_and_tensorboard_events(tmp_path):
    with MetricsWriter(tmp_path, fsync=True) as w:
        w.write(0, {"reward_mean": -1.0, "accuracy": torch.tensor(0.25), "n": np.int64(3),
                    "timing": {"gen_s": 1.5}, "note": "hi"})
        w.write(1, {"reward_mean": 2.0, "accuracy": 0.5})
        # flushed per record: a reader sees it before close
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines()
    first = orjson.loads(lines[0])
    assert first["accuracy"] == 0.25 and first["n"] == 3 and first["timing"] == {"gen_s": 1.5}
    assert first["note"] == "hi" and abs(first["time"] - __import__("time").time()) < 60
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_mean", "accuracy", "n", "timing/gen_s"} <= tags and "note" not in tags
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(0, -1.0), (1, 2.0)]


def test_reserved_keys_and_unserialisable_values(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match=r"reserved keys \['step'\]"):
            w.write(0, {"step": 1})
        with pytest.raises(ValueError, match=r"metrics at step 0 are not JSON-serialisable"):
            w.write(0, {"x": object()})
    assert read_metrics(tmp_path) == []


def test_truncated_last_line_is_tolerated_and_resume_appends_cleanly(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(0, {"accuracy": 0.1})
        w.write(1, {"accuracy": 0.2})
    path = tmp_path / "metrics.jsonl"
    with open(path, "ab") as f:                        # a crash mid-write
        f.write(b'{"step": 2, "accur')
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]

    with MetricsWriter(tmp_path, tensorboard=False) as w:   # a resumed run appends after it
        w.write(2, {"accuracy": 0.3})
    assert [r["accuracy"] for r in read_metrics(tmp_path)] == [0.1, 0.2, 0.3]
    assert (tmp_path / "metrics.jsonl.partial").read_bytes() == b'{"step": 2, "accur\n'


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0}\n\n{"step": 1, oops}\n{"step": 2}\n')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:3: not valid JSON"):
        read_metrics(tmp_path)
    path.write_bytes(b'{"step": 0}\n[1, 2]\n')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2: expected an object with an integer 'step'"):
        read_metrics(tmp_path)
    path.write_bytes(b'{"step": 0}\n{"step": 1, oops}\n')   # corrupt but terminated: not a crash artefact
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2"):
        read_metrics(tmp_path)
    with pytest.raises(MetricsError, match=r"no such run directory"):
        read_metrics(tmp_path / "nope")


def test_plot_writes_a_png_with_four_panels(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for s in range(6):
            w.write(s, {"reward_mean": -5 + s, "accuracy": s / 10, "tokens_per_s": 100.0 + s,
                        "truncation_rate": math.nan if s == 3 else 0.1})
    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    from matplotlib.image import imread
    img = imread(out)
    assert img.shape[:2] == (700, 1000) and img[..., :3].std() > 0.05   # not a blank canvas


def test_plot_missing_keys_say_no_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    blank = plot_run(empty, tmp_path / "blank.png")
    with MetricsWriter(tmp_path / "r", tensorboard=False) as w:
        for s in range(4):
            w.write(s, {"reward_mean": float(s)})
    partial = plot_run(tmp_path / "r", tmp_path / "out" / "partial.png")
    assert blank.stat().st_size > 5_000 and partial.stat().st_size > blank.stat().st_size
