"""The weight-update session against fake SGLang servers that join a real gloo group.

The fakes join the trainer's torch.distributed rendezvous as SGLang does (init_custom_process_group,
rank = rank_offset + tp_rank) and receive one broadcast per tensor, so what they hold at the end is
what crossed the group."""
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_sglang import FakeSGLang  # noqa: E402
import simhosts  # noqa: E402

from actors.generator.sglang.client import SGLangClient  # noqa: E402
from actors.weights.sglang_distributed import Server, SGLangWeightSync, TrainerGroup, free_port  # noqa: E402

ORDER = ["/pause_generation", "/begin_weight_update", "/update_weights_from_distributed",
         "/flush_cache", "/end_weight_update", "/continue_generation"]


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(32, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(8, generator=g),
            "lm_head.weight": torch.randn(32, 8, generator=g)}


def paths(fake, start=0):
    out = []
    for c in fake.calls[start:]:
        if not out or out[-1] != c["path"]:  # consecutive buckets and flush retries fold into one
            out.append(c["path"])
    return out


def assert_holds(fake, w):
    assert list(fake.weights) == list(w)
    for k, v in w.items():
        assert fake.weights[k].dtype == v.dtype and torch.equal(fake.weights[k], v), k


@pytest.fixture
async def fakes():
    made = []

    async def make(**kw):
        f = FakeSGLang(weight_version="0", token_delay=0.002, group_timeout=30, **kw)
        await f.start()
        made.append(f)
        return f
    yield make
    for f in made:
        await f.stop()


async def test_two_servers_receive_every_tensor_in_order_and_in_the_0523_call_order(fakes):
    a, b = await fakes(), await fakes(tp_size=2)
    sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", bucket_bytes=1500,
                            call_timeout=10, collective_timeout=30)
    try:
        w1 = weights(1)
        assert await sync.update([Server("gen-a", a.url), Server("gen-b", b.url, 2)], w1, 1) == {"gen-a", "gen-b"}
        for f in (a, b):
            assert_holds(f, w1)
            assert paths(f) [-6:] == ORDER
            assert f.weight_version == "1" and not f.session_open and f.pause_mode is None
            buckets = [c["body"] for c in f.calls if c["path"] == "/update_weights_from_distributed"]
            assert [n for body in buckets for n in body["names"]] == list(w1)  # list order = broadcast order
            assert len(buckets) == 2 and all(body["flush_cache"] is False and body["weight_version"] == "1"
                                             for body in buckets)
            assert buckets[0]["dtypes"] == ["float32", "bfloat16", "float32"]  # 1312 bytes, then lm_head
        inits = [next(c["body"] for c in f.calls if c["path"] == "/init_weights_update_group") for f in (a, b)]
        # a group per server: the trainer is rank 0 and the server's tp ranks follow it
        assert [(i["rank_offset"], i["world_size"], i["backend"]) for i in inits] == [(1, 2, "gloo"), (1, 3, "gloo")]
        assert inits[0]["group_name"] != inits[1]["group_name"]
        assert next(c["body"] for c in a.calls if c["path"] == "/pause_generation") == {"mode": "abort"}

        # a second update reuses the group (no second rendezvous); a generation in flight is
        # aborted by the pause (mode abort), not waited for
        w2 = weights(2)
        n_calls = len(a.calls)
        async with SGLangClient(a.url) as client:
            gen = asyncio.create_task(client.generate([[1, 2]], 2, {"max_new_tokens": 5000}))
            await asyncio.sleep(0.1)
            assert await sync.update([Server("gen-a", a.url), Server("gen-b", b.url, 2)], w2, 2) == {"gen-a", "gen-b"}
            [[s1, _]] = await gen
        assert s1.finish_reason == "abort" and len(s1.output_ids) < 5000
        assert [p for p in paths(a, n_calls) if p not in ("/model_info", "/generate")] == ORDER
        assert_holds(a, w2)
        assert_holds(b, w2)
    finally:
        await sync.close()
    assert a.groups == {} and b.groups == {}  # close() made the servers leave the group too


async def test_a_refused_flush_is_retried_until_the_server_is_idle(fakes):
    a = await fakes()
    refusals = []
    real_flush = a._h_flush_cache

    async def busy_then_idle(body, query):  # requests still running: SGLang answers 400, plain text
        if len(refusals) < 3:
            refusals.append(1)
            return 400, "Flush cache failed.\n"
        return await real_flush(body, query)
    a._h_flush_cache = busy_then_idle
    sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", call_timeout=10, collective_timeout=30)
    try:
        assert await sync.update([Server("gen-a", a.url)], weights(3), 7) == {"gen-a"}
    finally:
        await sync.close()
    flushes = [c for c in a.calls if c["path"] == "/flush_cache"]
    assert len(refusals) == 3 and [c.get("status", 200) for c in flushes][-1:] == [200]
    assert paths(a)[-5:] == ["/update_weights_from_distributed", "/flush_cache", "/end_weight_update",
                             "/continue_generation", "/destroy_weights_update_group"]
    assert a.weight_version == "7"
    assert_holds(a, weights(3))


async def test_a_server_that_never_flushes_is_dropped_and_left_running(fakes, caplog):
    caplog.set_level(logging.INFO)
    a = await fakes()

    async def always_busy(body, query):
        return 400, "Flush cache failed.\n"
    a._h_flush_cache = always_busy
    sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", call_timeout=0.5, collective_timeout=30,
                            attempts=2)
    try:
        t0 = time.monotonic()
        assert await sync.update([Server("gen-a", a.url)], weights(4), 1) == set()
        assert time.monotonic() - t0 < 20  # bounded: the group forms (a process starts), then 2 x 0.5 s
    finally:
        await sync.close()
    assert not a.session_open and a.pause_mode is None  # ended and continued after each failed attempt
    assert paths(a).count("/begin_weight_update") == 2
    assert "sglang server of gen-a" in caplog.text and "dropped from weight update v1 (2 failed attempts)" in caplog.text
    assert "flush_cache" in caplog.text


async def test_a_server_killed_mid_broadcast_is_aborted_alone_and_the_other_gets_the_weights(fakes, caplog,
                                                                                             monkeypatch):
    """The async/abort path on gloo: the dead server's group is aborted (our broadcast fails fast, the
    learner goes on), the other server's own group is neither re-formed nor held up."""
    caplog.set_level(logging.INFO)
    a = await fakes(update_delay=0.05)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_sglang.py")), "--port", str(port),
                             "--weight-version", "0", "--update-delay", "0.05"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        async with SGLangClient(url, health_timeout=20):
            pass  # it is up
        sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", bucket_bytes=600, call_timeout=20,
                                collective_timeout=30)
        w = weights(5)
        killed = []

        sending = []  # groups whose broadcast started
        real_broadcast = TrainerGroup.broadcast

        async def broadcast(self, tensors):
            sending.append(self.group_name)
            return await real_broadcast(self, tensors)
        monkeypatch.setattr(TrainerGroup, "broadcast", broadcast)

        async def kill_after_first_bucket():  # once gen-b's group is sending (or after 20 s)
            give_up = time.monotonic() + 20
            while not (sync._links.get("gen-b") and sync._links["gen-b"].group
                       and sync._links["gen-b"].group.group_name in sending) and time.monotonic() < give_up:
                await asyncio.sleep(0.002)
            killed.append(time.time())
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            killer = asyncio.create_task(kill_after_first_bucket())
            got = await sync.update([Server("gen-a", a.url), Server("gen-b", url)], w, 1)
            await killer
            assert got == {"gen-a"}
            [dropped] = [r for r in caplog.records if "dropped from weight update" in r.getMessage()]
            assert dropped.created - killed[0] < 10  # aborted on the error, not after the 30 s collective timeout
            assert_holds(a, w)
            assert a.weight_version == "1" and not a.session_open and a.pause_mode is None
            inits = [c["body"] for c in a.calls if c["path"] == "/init_weights_update_group"]
            assert [(i["rank_offset"], i["world_size"]) for i in inits] == [(1, 2)]  # its group was never re-formed
            assert "aborting the group" in caplog.text
            assert f"sglang server of gen-b ({url}) dropped from weight update v1" in caplog.text
            assert list(sync._links) == ["gen-a", "gen-b"]
            # the learner goes on: the next version reaches the survivor over its same group
            assert await sync.update([Server("gen-a", a.url)], weights(6), 2) == {"gen-a"}
            assert_holds(a, weights(6))
            assert len([c for c in a.calls if c["path"] == "/init_weights_update_group"]) == 1
            await sync.retain({"gen-a"})  # gen-b left the bus: its link (client, group) goes
            assert list(sync._links) == ["gen-a"]
        finally:
            await sync.close()
        assert sync._links == {} and a.groups == {}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def test_the_group_is_not_the_default_group_and_leaves_one_alone(fakes):
    """A learner may own the default process group (data parallel); the weight group never touches it."""
    import torch.distributed as dist
    a = await fakes()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", call_timeout=10, collective_timeout=30)
    try:
        default = dist.group.WORLD
        assert await sync.update([Server("gen-a", a.url)], weights(6), 1) == {"gen-a"}
        assert dist.group.WORLD is default and dist.get_world_size() == 1 and dist.get_rank() == 0
        assert sync._links["gen-a"].group._pg is not default
        t = torch.ones(3)
        dist.all_reduce(t)  # the default group still works
        assert torch.equal(t, torch.ones(3))
        assert_holds(a, weights(6))
    finally:
        await sync.close()
        dist.destroy_process_group()


LEARNER = r"""
import asyncio, json, logging, os, sys
sys.path.insert(0, sys.argv[1])
from test_sglang_weights import weights
from actors.weights.sglang_distributed import Server, SGLangWeightSync
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
async def main():
    sync = SGLangWeightSync(backend="gloo", call_timeout=20, collective_timeout=20)  # master: the route to B
    try:
        got = await sync.update([Server("gen-b", sys.argv[2])], weights(7), 1)
    finally:
        await sync.close()
    print(json.dumps(sorted(got)), flush=True)
asyncio.run(main())
os._exit(0)  # what B got is printed; gloo's threads at interpreter exit sometimes abort() (noted in docs/SGLANG.md)
"""

ROGUE = r"""
import datetime, re, sys, time, json
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from fake_sglang import init_custom_process_group
log, report = Path(sys.argv[2]), Path(sys.argv[3])
out = {"joined": [], "received": {}}
deadline = time.monotonic() + 40
while time.monotonic() < deadline and not (m := re.search(r"tcp://([\d.]+):(\d+)", log.read_text())):
    time.sleep(0.01)
host, port = m.group(1), int(m.group(2))
store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=5))
names = {k.split("/")[0] for k in store.list_keys() if "/" in k} | {"weight_update_group"}
for name in sorted(names):  # what an attacker finds on the open store, and the default name
    try:
        pg = init_custom_process_group("gloo", f"tcp://{host}:{port}", 2, 1, name, datetime.timedelta(seconds=8))
    except Exception as exc:
        continue
    out["joined"].append(name)
    for k, shape in [("model.embed_tokens.weight", (32, 8))]:
        t = torch.zeros(shape)
        try:
            dist.broadcast(t, src=0, group=pg)
            out["received"][k] = t.tolist()
        except Exception:
            pass
report.write_text(json.dumps(out))
"""


@pytest.mark.skipif(simhosts.skip_reason() is not None, reason=str(simhosts.skip_reason()))
def test_a_server_on_another_host_gets_the_weights_and_a_keyless_stranger_on_the_rendezvous_gets_none(tmp_path):
    """Learner on host A, a fake SGLang on host B: the rendezvous master is A's address towards B (not
    loopback) and B ends with the reference weights. A stranger on host C, holding no key, reads the
    open rendezvous store and tries to join as the server's rank under every name it finds: it is
    not sent a byte of weights, and B still gets them."""
    tests = str(Path(__file__).parent)
    # gloo picks its interface from the hostname unless told: on a cluster, GLOO_SOCKET_IFNAME names it
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0",
           "PYTHONPATH": f"{Path(__file__).parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with simhosts.SimHosts(3, tmp_path, sshd=False) as net:
        a, b, c = net.hosts
        port = 31000
        server = subprocess.Popen(net.argv(b, [sys.executable, str(Path(tests) / "fake_sglang.py"), "--host", b.addr,
                                                "--port", str(port), "--weight-version", "0",
                                                "--dump-weights", str(tmp_path / "b")]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        learner_log, rogue_report = tmp_path / "learner.log", tmp_path / "rogue.json"
        learner_log.write_text("")
        rogue = subprocess.Popen(net.argv(c, [sys.executable, "-c", ROGUE, tests, str(learner_log), str(rogue_report)]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        time.sleep(3)  # the stranger waits, torch imported, for the rendezvous to open
        with open(learner_log, "w") as err:
            learner = subprocess.run(net.argv(a, [sys.executable, "-c", LEARNER, tests, f"http://{b.addr}:{port}"]),
                                     stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=120)
        rogue_err = rogue.communicate(timeout=60)[1]
        server.kill()
        server.wait()
    text = learner_log.read_text()
    assert learner.returncode == 0, (learner.returncode, text[-2000:])
    assert json.loads(learner.stdout.splitlines()[-1]) == ["gen-b"], text[-2000:]
    assert f"at tcp://{a.addr}:" in text  # A's address on the route to B, not 127.0.0.1
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "b" / "weights.safetensors"))
    for k, v in weights(7).items():
        assert torch.equal(got[k], v), k
    report = json.loads(rogue_report.read_text()) if rogue_report.exists() else {"error": rogue_err[-1500:]}
    ref = weights(7)["model.embed_tokens.weight"]
    for k, t in report.get("received", {}).items():
        assert not torch.equal(torch.tensor(t), ref), f"the stranger received {k}"
