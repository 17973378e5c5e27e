"""How a generator launches its SGLang server on a GPU cluster: the learner's dtype, the job's API key
(sent by every client, checked as SGLang checks it, never logged), the host's address towards the bus,
the planner's GPUs and the NCCL settings the learner shares in its environment, and a server that dies
with its generator even when that generator is SIGKILLed."""
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_sglang import auth_allowed  # noqa: E402

FAKE = str(Path(__file__).with_name("fake_sglang.py"))


def test_the_launch_carries_dtype_key_address_and_nccl_env(monkeypatch):
    from actors.generator.sglang.backend import make_sglang_backend
    from actors.generator.sglang.server import (NCCL_ENV, SGLangLaunch, address_towards, launch_argv, launch_env,
                                                redacted)
    from types import SimpleNamespace
    section = SimpleNamespace(sglang_url=None, sglang_tp_size=2, sglang_health_timeout=60, sglang_weights="distributed",
                              sglang_args=[], sglang_command=None, sglang_mem_fraction_static=0.5)
    b = make_sglang_backend(section, model_path="/m", step=4, seed=1, request_timeout=60,
                            interrupt_on_update=True, dtype="bfloat16", bind="127.0.0.1", api_key="s3cret")
    argv = launch_argv(b._server.cfg)
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--mem-fraction-static") + 1] == "0.5"
    assert argv[argv.index("--api-key") + 1] == "s3cret" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "s3cret" not in " ".join(redacted(argv)) and "--api-key" in redacted(argv)
    assert b._api_key == "s3cret" and "s3cret" not in repr(b.__dict__.get("_server"))
    # an operator's own --dtype wins over ours
    own = SGLangLaunch(model_path="/m", port=1, dtype="bfloat16", extra_args=["--dtype", "float16"])
    assert launch_argv(own).count("--dtype") == 1
    # beyond loopback only with a key (the HTTP port has endpoints that unpickle)
    with pytest.raises(ValueError, match="host='10.0.0.5'.*api_key"):
        SGLangLaunch(model_path="/m", port=1, host="10.0.0.5")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        SGLangLaunch(model_path="/m", port=1, dtype="fp8")
    # the server's environment: NCCL settings as the learner's, the planner's GPUs over them
    env = launch_env(SGLangLaunch(model_path="/m", port=1, env={"CUDA_VISIBLE_DEVICES": "2,3"}), base={})
    assert env == {**NCCL_ENV, "CUDA_VISIBLE_DEVICES": "2,3"}
    assert NCCL_ENV["NCCL_CUMEM_ENABLE"] == "0" and NCCL_ENV["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert launch_env(SGLangLaunch(model_path="/m", port=1), base={"NCCL_CUMEM_ENABLE": "1"})["NCCL_CUMEM_ENABLE"] == "1"
    # a one-host job binds loopback; the URL registered on the bus is the bind address
    assert address_towards("127.0.0.1") == "127.0.0.1"
    assert b.url.startswith("http://127.0.0.1:")
    # the fake checks the key as SGLang 0.5.23 does
    assert auth_allowed("/health", None, "k") and not auth_allowed("/generate", None, "k")
    assert auth_allowed("/generate", "bearer k", "k") and not auth_allowed("/generate", "Bearer kk", "k")
    assert not auth_allowed("/update_weights_from_tensor", "Basic k", "k") and auth_allowed("/generate", None, None)
    # the job's key file, named in the environment, reaches every client without being passed
    from actors.generator.sglang.client import API_KEY_FILE_ENV, SGLangClient
    monkeypatch.setenv(API_KEY_FILE_ENV, "/nonexistent/key")
    with pytest.raises(ValueError, match="BOBA_SGLANG_KEY_FILE=/nonexistent/key"):
        SGLangClient("http://127.0.0.1:1")


async def test_a_keyed_server_serves_its_key_holders_only_and_never_logs_the_key(tmp_path, monkeypatch):
    from actors.generator.sglang.backend import SGLangGeneratorBackend
    from actors.generator.sglang.client import API_KEY_FILE_ENV, SGLangClient
    from actors.generator.sglang.protocol import SGLangRefused
    from actors.generator.sglang.server import SGLangLaunch
    from actors.weights.sglang_distributed import free_port
    key = "k-" + os.urandom(8).hex()
    (tmp_path / "key").write_text(key)
    monkeypatch.setenv(API_KEY_FILE_ENV, str(tmp_path / "key"))
    monkeypatch.delenv("NCCL_CUMEM_ENABLE", raising=False)
    log_file = tmp_path / "server.log"
    b = SGLangGeneratorBackend(model_path="fake-model", health_timeout=20, launch=SGLangLaunch(
        model_path="fake-model", port=free_port(), command=[sys.executable, FAKE, "--startup-delay", "0"],
        dtype="bfloat16", api_key=key, env={"CUDA_VISIBLE_DEVICES": "5"}, log_file=str(log_file)))
    await b.start()
    try:
        info = (await b._http.get("/_fake/launch")).json()
        assert info["dtype"] == "bfloat16" and info["keyed"]
        assert info["env"] == {"CUDA_VISIBLE_DEVICES": "5", "NCCL_CUMEM_ENABLE": "0",
                               "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
        assert (await b.generate_group("r", [1, 2], 1, {"max_new_tokens": 2}))
        # the learner's client of the same server finds the key in the job's key file
        async with SGLangClient(b.url) as learner_side:
            assert await learner_side.weight_version() == 0
        monkeypatch.delenv(API_KEY_FILE_ENV)
        stranger = SGLangClient(b.url)
        await stranger.start(wait=False)
        try:
            with pytest.raises(SGLangRefused, match="401"):
                await stranger.weight_version()
        finally:
            await stranger.close()
    finally:
        await b.close()
    logged = log_file.read_text() + "\n".join(b._log_tail())
    assert "fake sglang" in logged and key not in logged


CHILD = """
import asyncio, sys, time
from actors.generator.sglang.server import ServerProcess, SGLangLaunch
async def main():
    s = ServerProcess(SGLangLaunch(model_path="m", port=1, command=[sys.executable, "-c",
                      "import time; time.sleep(120)"]))
    await s.start()
    print(s.proc.pid, flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_server_dies_with_a_sigkilled_generator():
    gen = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    server = None
    try:
        server = int(gen.stdout.readline())
        os.kill(gen.pid, signal.SIGKILL)
        gen.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(server):
            time.sleep(0.05)
        if alive(server):
            pytest.fail(f"the SGLang child {server} outlived its SIGKILLed generator")
    finally:
        gen.kill()
        if server:
            try:
                os.killpg(server, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_server_of_a_job_across_hosts_listens_on_the_address_towards_the_bus(tmp_path, monkeypatch):
    import socket

    from actors.generator.sglang.client import API_KEY_FILE_ENV
    from launcher.config import load_config
    from launcher.job.builders.generator import sglang_backend
    from launcher.job.start import Start
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: only the route is looked up
            own = s.getsockname()[0]
        except OSError:
            pytest.skip("this machine has no route beyond loopback")
    if own.startswith("127."):
        pytest.skip("this machine has no address beyond loopback")
    cfg = load_config(None, ["model.path=tiny", "actors.generator.backend=sglang", "model.dtype=bfloat16"])
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)
    b = sglang_backend(cfg, Start(0, "m"), f"tcp://{own}:5555")  # no key: loopback only
    assert b._server.cfg.host == "127.0.0.1"
    (tmp_path / "key").write_text("k")
    monkeypatch.setenv(API_KEY_FILE_ENV, str(tmp_path / "key"))
    b = sglang_backend(cfg, Start(0, "m"), f"tcp://{own}:5555")
    assert b._server.cfg.host == own and b.url.startswith(f"http://{own}:") and b.capabilities["sglang_url"] == b.url
    assert b._server.cfg.api_key == "k" and b._server.cfg.dtype == "bfloat16"
    assert sglang_backend(cfg, Start(0, "m"), "tcp://127.0.0.1:5555")._server.cfg.host == "127.0.0.1"
