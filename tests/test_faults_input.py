"""Bad input, each a clear error that names the input and loses nothing.

The launcher checks run in this process through `launcher.__main__.main` (the `python -m launcher`
code path): they must fail before any process starts. The packer meets a rollout whose header lies
about its sizes over a real broker and a real shared-memory channel.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

import msgpack
import pytest
import torch

from actors.learner import checkpoint
from actors.learner.checkpoint import CheckpointError
from launcher.__main__ import main
from launcher.config import load_config
from launcher.mathdata import make_dataset
from launcher.job.start import resolve_start

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=8, n_test=2, n_sft=2, seed=0)["train"]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def run_args(run_dir: Path, train: Path, *more: str) -> list[str]:
    return ["--config", TINY, "-o", f"run_dir={run_dir}", "-o", f"data.train={train}", "-o", "data.test=null", *more]


# ----------------------------------------------------------------------------------------- launcher input

def test_malformed_jsonl_line_stops_the_launcher_naming_file_and_line(tmp_path, train, capsys):
    bad = tmp_path / "train.jsonl"
    lines = train.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"prompt": "1+1?", "answer": '] + lines[2:]) + "\n")
    rc, err = run_cli(capsys, *run_args(tmp_path / "run", bad))
    assert rc == 2 and f"{bad}:3" in err
    assert not (tmp_path / "run").exists(), "something started"
    rc, _ = run_cli(capsys, "--dry-run", *run_args(tmp_path / "run", bad, "-o", "data.skip_malformed=true"))
    assert rc == 0  # skipping is the user's explicit choice (counted and logged by the loader)


@pytest.mark.parametrize("override, named", [
    ("train.steps=many", "train.steps"),
    ("rollout.temperature=[1]", "rollout.temperature"),
    ("train.on_learner_death=retry", "train.on_learner_death"),
    ("bus.heartbeat_intervall=1", "bus.heartbeat_intervall: unknown key"),
])
def test_config_keys_and_types_are_checked_before_anything_starts(tmp_path, train, capsys, override, named):
    rc, err = run_cli(capsys, *run_args(tmp_path / "run", train, "-o", override))
    assert rc == 2 and named in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "run").exists()


def test_a_model_path_that_is_not_a_model_is_named(tmp_path, train, capsys):
    junk = tmp_path / "not-a-model"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    rc, err = run_cli(capsys, *run_args(tmp_path / "run", train, "-o", f"model.path={junk}"))
    assert rc == 2 and f"model.path: model path '{junk}' is not a model directory: missing config.json" in err
    rc, err = run_cli(capsys, *run_args(tmp_path / "run", train, "-o", f"model.path={tmp_path / 'nope'}"))
    assert rc == 2 and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_unreachable_host_is_named_before_anything_starts(tmp_path, train, capsys):
    from bus.keys import generate_keys
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost slots=1\nno-such-host.invalid slots=1\n")
    t0 = time.monotonic()
    rc, err = run_cli(capsys, "--hosts", str(hosts), *run_args(
        tmp_path / "run", train, "-o", "actors.generator.count=2", "-o", f"bus.host={socket.gethostname()}",
        "-o", f"bus.keys_dir={generate_keys(tmp_path / 'keys')}"))
    assert rc == 2, err
    assert "unreachable host (ssh -o BatchMode=yes): no-such-host.invalid: ssh exited with code 255" in err
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "run" / "logs").exists(), "a process was started"


# ----------------------------------------------------------------------------------------- checkpoints

def _save(run_dir: Path, step: int, seed: int = 0) -> Path:
    from policies.model.loading import tiny_model
    from policies.train.ppo import PPOConfig, make_optimizer
    model = tiny_model(seed=seed)
    opt = make_optimizer(model, PPOConfig())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()  # an optimizer with state to save
    return checkpoint.save(run_dir, step, model, None, opt, keep=5)


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpts") / "run"
    _save(run_dir, 2, seed=0)
    _save(run_dir, 4, seed=1)
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_verify_names_a_truncated_or_missing_file(two_checkpoints, tmp_path):
    run_dir = _copy(two_checkpoints, tmp_path / "run")
    ckpt = checkpoint.checkpoint_dir(run_dir, 4)
    state = checkpoint.verify(ckpt)
    assert state["step"] == 4 and len(state["digest"]) == 64 and "model/model.safetensors" in state["files"]
    whole = (ckpt / "model" / "model.safetensors").read_bytes()
    _truncate(ckpt / "model" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step-000004: model/model.safetensors is \d+ bytes, \d+ were "
                                              r"written \(truncated on disk\)"):
        checkpoint.verify(ckpt)
    (ckpt / "model" / "model.safetensors").write_bytes(whole)
    checkpoint.verify(ckpt)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        checkpoint.verify(ckpt)


def test_verify_checks_headers_of_checkpoints_without_recorded_sizes(two_checkpoints, tmp_path):
    run_dir = _copy(two_checkpoints, tmp_path / "run")
    ckpt = checkpoint.checkpoint_dir(run_dir, 2)
    state = json.loads((ckpt / "state.json").read_text())
    del state["files"]  # as written before sizes were recorded
    (ckpt / "state.json").write_text(json.dumps(state))
    checkpoint.verify(ckpt)
    _truncate(ckpt / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt is damaged or truncated"):
        checkpoint.verify(ckpt)
    (ckpt / "optimizer.pt").write_bytes((two_checkpoints / "checkpoints" / "step-000002" / "optimizer.pt").read_bytes())
    _truncate(ckpt / "model" / "model.safetensors", keep=1000)
    with pytest.raises(CheckpointError, match=r"model/model.safetensors is (truncated|1000 bytes but its header)"):
        checkpoint.verify(ckpt)


def test_resume_skips_a_damaged_checkpoint_naming_it_or_fails_when_none_is_whole(two_checkpoints, tmp_path,
                                                                                  train, capsys, caplog):
    run_dir = _copy(two_checkpoints, tmp_path / "run")
    cfg = load_config(TINY, [f"run_dir={run_dir}", f"data.train={train}"])
    assert resolve_start(cfg, resume=True).step == 4
    newest = checkpoint.checkpoint_dir(run_dir, 4) / "model" / "model.safetensors"
    _truncate(newest)
    with caplog.at_level(logging.WARNING, logger="launcher.job.start"):
        start = resolve_start(cfg, resume=True)
    assert start.step == 2 and start.checkpoint == str(checkpoint.checkpoint_dir(run_dir, 2))
    assert "step-000004: model/model.safetensors" in caplog.text and "falling back to" in caplog.text

    _truncate(checkpoint.checkpoint_dir(run_dir, 2) / "optimizer.pt")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    rc, err = run_cli(capsys, "--resume", *run_args(run_dir, train))
    assert rc == 2
    assert "--resume: no usable checkpoint" in err
    assert "step-000004: model/model.safetensors" in err and "step-000002: optimizer.pt" in err
    # nothing touched: the only new file is the launcher's lock, taken before it reads the checkpoints
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == sorted({*before, Path(".lock")})


def test_a_crash_mid_save_leaves_the_previous_checkpoint_the_latest(two_checkpoints, tmp_path, monkeypatch, train):
    run_dir = _copy(two_checkpoints, tmp_path / "run")
    real_save = torch.save

    def dies_half_way(obj, path, *a, **kw):
        real_save(obj, path, *a, **kw)
        if str(path).endswith("optimizer.pt"):
            _truncate(Path(path))
            raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        _save(run_dir, 6)
    monkeypatch.undo()
    assert (run_dir / "checkpoints" / "step-000006.tmp").is_dir()  # the debris of the crash
    assert checkpoint.latest(run_dir) == checkpoint.checkpoint_dir(run_dir, 4)
    cfg = load_config(TINY, [f"run_dir={run_dir}", f"data.train={train}"])
    assert resolve_start(cfg, resume=True).step == 4
    _save(run_dir, 6)  # the next save clears the debris
    assert not (run_dir / "checkpoints" / "step-000006.tmp").exists()
    assert checkpoint.verify(checkpoint.checkpoint_dir(run_dir, 6))["step"] == 6


# ----------------------------------------------------------------------------------------- a lying header

def _lie_about_sizes(desc: dict) -> None:
    """Rewrite the wire header in the shm segment: input_ids claims 8 bytes more than it has."""
    from tensors.channels.shm import _HEADER_OFFSET, _State
    fd = os.open(desc["path"], os.O_RDWR)
    try:
        state = _State.read(fd)
        raw = os.pread(fd, state.header_len, _HEADER_OFFSET)
        header = msgpack.unpackb(raw)
        entry = next(t for t in header["tensors"] if t["name"] == "input_ids")
        entry["nbytes"] += 8
        lie = msgpack.packb(header)
        assert len(lie) == len(raw)
        os.pwrite(fd, lie, _HEADER_OFFSET)
    finally:
        os.close(fd)


async def test_packer_rejects_a_rollout_whose_header_lies_and_trains_the_true_copy():
    from actors import protocol as P
    from actors.generator.generator import Sample, rollout_batch
    from actors.packer import Packer
    from bus.broker import Broker
    from bus.client import BusClient
    from tensors.channels import Channels, TensorOptions, open_channel

    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=0.2)
    await broker.start()
    got: dict[str, list] = {P.ACCEPTED: [], P.REJECTED: [], P.TRAIN: []}
    sampler = BusClient(broker.address, "sampler", "sampler", heartbeat_interval=0.2)
    learner = BusClient(broker.address, "learner", "learner", heartbeat_interval=0.2)
    verifier = BusClient(broker.address, "verifier-0", "verifier", heartbeat_interval=0.2)
    for kind in (P.ACCEPTED, P.REJECTED):
        sampler.on(kind, lambda body, src, kind=kind: got[kind].append(body))
    learner.on(P.TRAIN, lambda body, src: got[P.TRAIN].append(body))
    packer = Packer(broker.address, batch_prompts=1, heartbeat_interval=0.2)
    channel = open_channel("shm")
    try:
        for c in (sampler, learner, verifier):
            await c.connect(timeout=5)
        await packer.start()
        batch = rollout_batch([1, 2, 3], [Sample([4, 5], [-0.5, -0.7], [0, 0], "length")] * 2)

        async def scored(desc: dict) -> None:
            await verifier.request("packer", P.SCORED, {
                "step": 0, "qid": "q-7", "rewards": [5.0, -5.0], "correct": [True, False], "reward_errors": 0,
                "rollout_ref": desc, "generator": "generator-0", "stats": {"truncated": [True, True], "response_tokens": [2, 2],
                                                      "version_min": 0, "version_max": 0}}, timeout=5)

        async def until(pred, what: str) -> None:
            deadline = time.monotonic() + 10
            while not pred():
                assert time.monotonic() < deadline, f"timed out waiting for {what}: {got}"
                await asyncio.sleep(0.02)

        lying = await channel.send(batch, timeout=30)
        _lie_about_sizes(lying)
        await scored(lying)
        await until(lambda: got[P.REJECTED], "REJECTED")
        rejected = got[P.REJECTED][0]
        assert (rejected["step"], rejected["qid"]) == (0, "q-7")
        assert "decode" in rejected["reason"] and "input_ids" in rejected["reason"]
        assert not got[P.ACCEPTED] and not got[P.TRAIN]

        await scored(await channel.send(batch, timeout=30))  # the sampler dealt it again: the true copy
        await until(lambda: got[P.TRAIN], "TRAIN")
        assert got[P.ACCEPTED] == [{"step": 0, "qid": "q-7"}]
        rx = Channels(TensorOptions(host="127.0.0.1"))
        trained = await rx.recv(got[P.TRAIN][0]["batch_ref"], timeout=5)
        await rx.close()
        assert trained.meta["qids"] == ["q-7", "q-7"] and torch.equal(trained.input_ids, batch.input_ids)
    finally:
        await packer.stop()
        await channel.close()
        for c in (sampler, learner, verifier):
            await c.close()
        await broker.stop()


# ----------------------------------------------------------------------------------------- delivery

async def test_deliver_sends_again_until_acknowledged_and_names_the_peer_when_time_runs_out():
    from actors.base import Actor
    from bus.broker import Broker
    from bus.client import BusClient
    from bus.errors import BusTimeout, RemoteError

    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=0.2)
    await broker.start()
    sender = Actor("sender", "test", broker.address, heartbeat_interval=0.2)
    late = BusClient(broker.address, "late", "test", heartbeat_interval=0.2)
    seen: list[int] = []
    never = asyncio.Event()

    async def first_copy_lost(body, src):
        seen.append(body)
        if len(seen) == 1:
            await never.wait()  # its answer never comes, as if the broker had died with it

    late.on("work", first_copy_lost)
    late.on("broken", lambda body, src: 1 / 0)
    try:
        await sender.start()
        registering = asyncio.ensure_future(asyncio.sleep(0.5))
        registering.add_done_callback(lambda _: asyncio.ensure_future(late.connect(timeout=5)))
        t0 = time.monotonic()
        # not on the bus yet (PeerGone), then the first copy's answer is lost: delivered on the next copy
        await sender.deliver("late", "work", 7, within=10, attempt=0.5, gone_grace=5)
        assert seen == [7, 7] and 0.5 < time.monotonic() - t0 < 5
        with pytest.raises(RemoteError, match="ZeroDivisionError"):  # a failing handler is not hammered
            await sender.deliver("late", "broken", None, within=10)
        with pytest.raises(BusTimeout, match=r"an answer to 'work' from 'nobody'"):
            await sender.deliver("nobody", "work", 1, within=0.6, attempt=0.2, gone_grace=5)
    finally:
        never.set()
        await sender.stop()
        await late.close()
        await broker.stop()
