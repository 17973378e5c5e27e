"""The sglang generator on a real bus: it joins only once its server answers /health, and the
broadcaster, asked by the learner over the bus, sends it weights over the torch.distributed session
while a torch generator keeps getting them over a tensor channel."""
import asyncio
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_sglang import FakeSGLang  # noqa: E402

from actors import protocol as P  # noqa: E402
from actors.base import Actor, handler  # noqa: E402
from actors.learner.learner import Learner, LearnerSettings  # noqa: E402
from actors.weights.broadcaster import WeightBroadcaster, snapshot  # noqa: E402
from actors.generator.generator import Generator  # noqa: E402
from actors.generator.sglang.protocol import SGLangTimeout  # noqa: E402
from actors.generator.sglang.backend import SGLangGeneratorBackend  # noqa: E402
from actors.weights.sglang_distributed import SGLangWeightSync  # noqa: E402
from policies.train.ppo import PPOConfig  # noqa: E402

HB = 0.2


def sglang_generator(broker, url, **kw):
    backend = SGLangGeneratorBackend(url, model_path="fake-model", control_timeout=5, **kw)
    return Generator("generator-sgl", broker.address, backend=backend, tokenizer=None, heartbeat_interval=HB)


async def test_the_generator_joins_the_bus_only_once_its_server_answers_health(broker):
    fake = FakeSGLang(weight_version="0", startup_delay=1.0)
    await fake.start()
    gen = sglang_generator(broker, fake.url, health_timeout=10)
    try:
        starting = asyncio.create_task(gen.start())
        await asyncio.sleep(0.6)
        assert not starting.done() and "generator-sgl" not in broker.registry  # /health still 503
        await asyncio.wait_for(starting, 10)
        info = broker.registry["generator-sgl"]
        assert info.capabilities == {"backend": "SGLangGeneratorBackend", "sglang_url": fake.url,
                                     "sglang_tp_size": 1, "weights": "distributed"}
    finally:
        await gen.stop()
        await fake.stop()


async def test_a_server_that_never_gets_healthy_is_a_clear_error_and_nothing_registers(broker):
    fake = FakeSGLang(weight_version="0", startup_delay=60)
    await fake.start()
    gen = sglang_generator(broker, fake.url, health_timeout=0.5)
    try:
        with pytest.raises(SGLangTimeout) as e:
            await asyncio.wait_for(gen.start(), 10)
        assert f"sglang at {fake.url}: health: timed out after 0.5 s" in str(e.value)
        assert "503 starting" in str(e.value)
        assert "generator-sgl" not in broker.registry
    finally:
        await fake.stop()


class TorchGeneratorStandIn(Actor):
    """Takes UPDATE_WEIGHTS over a tensor channel, as the torch generator does."""
    role = "generator"

    def __init__(self, address):
        super().__init__("generator-torch", self.role, address, heartbeat_interval=HB)
        self.got: list[tuple[int, dict]] = []

    @handler(P.UPDATE_WEIGHTS, from_roles=(P.BROADCASTER,))
    async def on_update(self, body, src):
        self.got.append((body["version"], await self.channels.recv(body["weights_ref"], timeout=5)))
        return {"version": body["version"]}


async def test_the_broadcaster_sends_sglang_generators_weights_over_the_group_and_torch_ones_over_a_channel(
        broker, tmp_path):
    model = torch.nn.Linear(4, 3)
    fake = FakeSGLang(weight_version="0")
    await fake.start()
    gen = sglang_generator(broker, fake.url)
    other = TorchGeneratorStandIn(broker.address)
    sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", call_timeout=10, collective_timeout=30)
    bc = WeightBroadcaster(broker.address, weights=snapshot(model), sglang=sync, heartbeat_interval=HB)
    settings = LearnerSettings(run_dir=tmp_path, total_steps=2, start_step=0, recompute=False, checkpoint_every=0,
                               keep_checkpoints=1)
    learner = Learner(broker.address, model=model, tokenizer=None, optimizer=None, ppo=PPOConfig(), settings=settings,
                      heartbeat_interval=HB)
    try:
        await gen.start()
        await other.start()
        await bc.start()  # v0 to both
        await learner.start()
        with torch.no_grad():
            model.weight.add_(1.0)
        assert await learner.publish_weights(1) == {"updated": 2, "failed": 0, "seconds": pytest.approx(0, abs=60)}
        assert bc.announced == {"version": 1, "generators": ["generator-sgl", "generator-torch"]}
        assert fake.weight_version == "1"
        for k, v in model.state_dict().items():
            assert torch.equal(fake.weights[k], v) and torch.equal(other.got[-1][1][k], v), k
        assert [v for v, _ in other.got] == [0, 1]
        paths = [c["path"] for c in fake.calls]
        assert paths.count("/init_weights_update_group") == 1  # one group for both versions
        assert paths.count("/end_weight_update") == 2 and "/update_weights_from_disk" not in paths
        # a second copy of the request (its answer lost) is answered without a second update
        assert (await learner.publish_weights(1))["updated"] == 2
        assert [c["path"] for c in fake.calls].count("/end_weight_update") == 2
        assert [v for v, _ in other.got] == [0, 1]
    finally:
        await learner.stop()
        await bc.stop()
        await other.stop()
        await gen.stop()
        await fake.stop()


def test_the_generator_section_decides_how_the_server_starts_and_how_weights_reach_it():
    from actors.generator.sglang.backend import make_sglang_backend
    from actors.generator.sglang.server import launch_argv
    from launcher.config import load_config
    cfg = load_config(None, ["actors.generator.backend=sglang", "actors.generator.sglang_tp_size=2",
                             "actors.generator.sglang_command=[/opt/sgl/bin/python, -m, sglang.launch_server]",
                             "actors.generator.sglang_args=[--dtype, bfloat16]"])
    b = make_sglang_backend(cfg.actors.generator, model_path="/m", step=4, seed=cfg.seed,
                            request_timeout=cfg.rollout.request_timeout, interrupt_on_update=True)
    argv = launch_argv(b._server.cfg)
    assert argv[:3] == ["/opt/sgl/bin/python", "-m", "sglang.launch_server"]
    assert argv[argv.index("--tp-size") + 1] == "2" and argv[argv.index("--weight-version") + 1] == "4"
    assert argv[-2:] == ["--dtype", "bfloat16"]
    assert b.capabilities == {"sglang_url": b.url, "sglang_tp_size": 2, "weights": "distributed"}
    cfg = load_config(None, ["actors.generator.backend=sglang", "actors.generator.sglang_url=http://h:30000",
                             "actors.generator.sglang_weights=disk"])
    b = make_sglang_backend(cfg.actors.generator, model_path="/m", step=0, seed=cfg.seed,
                            request_timeout=cfg.rollout.request_timeout, interrupt_on_update=True)
    assert b._server is None and b.capabilities["weights"] == "disk" and b.url == "http://h:30000"


async def test_a_launched_server_that_dies_marks_the_backend_failed():
    import os
    import signal

    from actors.generator.sglang.backend import SGLangGeneratorBackend
    from actors.generator.sglang.protocol import SGLangUnreachable
    from actors.generator.sglang.server import SGLangLaunch
    from actors.weights.sglang_distributed import free_port
    port = free_port()
    b = SGLangGeneratorBackend(model_path="fake-model", health_timeout=20, launch=SGLangLaunch(
        model_path="fake-model", port=port, command=[sys.executable, str(Path(__file__).with_name("fake_sglang.py"))]))
    await b.start()
    try:
        assert b.failed is None
        os.killpg(b.pid, signal.SIGKILL)
        with pytest.raises(SGLangUnreachable, match=f"127.0.0.1:{port}: generate"):
            await b.generate_group("r", [1, 2], 1, {"max_new_tokens": 2})
        for _ in range(100):
            if b.failed:
                break
            await asyncio.sleep(0.02)
        assert b.failed == f"its sglang server at http://127.0.0.1:{port} exited with code -9"
    finally:
        await b.close()
