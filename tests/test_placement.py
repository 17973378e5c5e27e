"""GPU placement against GPU inventories: every learner rank a GPU of its own, every SGLang server
sglang_tp_size GPUs of one host, a server on learner rank 0's GPU only when asked, what cannot fit refused
naming the config key; a CPU job planned by slots exactly as before; --dry-run shows every device."""
import pytest

from launcher.job.hosts import Host, HostsError, parse_hosts_text
from launcher.job.placement import Demand, assign, device_ids, inventory, local_gpus, server_hosts


def L(name, host="localhost"):
    return Demand(name, host, 1, "learner")


def S(name, tp=1, host="localhost"):
    return Demand(name, host, tp, "sglang")


def test_assign_over_inventories():
    one = [("localhost", 1)]
    # one GPU: the server only beside learner rank 0 when asked
    with pytest.raises(HostsError, match=r"^actors.generator.count: generator-0's server needs 1 free GPU.*"
                                         r"sglang_share_learner_gpu: true"):
        assign(one, [L("learner"), S("generator-0")])
    assert assign(one, [L("learner"), S("generator-0")], share_learner_gpu=True) == {
        "learner": (0,), "generator-0": (0,)}
    with pytest.raises(HostsError, match="^actors.generator.count: generator-1"):  # one server at most
        assign(one, [L("learner"), S("generator-0"), S("generator-1")], share_learner_gpu=True)
    # two GPUs: one each
    assert assign([("localhost", 2)], [L("learner"), S("generator-0")]) == {"learner": (0,), "generator-0": (1,)}
    # eight GPUs: four learner ranks, two TP-2 servers
    eight = [("localhost", 8)]
    ranks = [L("learner")] + [L(f"learner-rank-{r}") for r in range(1, 4)]
    got = assign(eight, ranks + [S("generator-0", 2), S("generator-1", 2)])
    assert got == {"learner": (0,), "learner-rank-1": (1,), "learner-rank-2": (2,), "learner-rank-3": (3,),
                   "generator-0": (4, 5), "generator-1": (6, 7)}
    with pytest.raises(HostsError, match=r"^actors.generator.count: generator-2's server needs 2 free GPU\(s\) "
                                         r"on localhost, 0 left"):
        assign(eight, ranks + [S(f"generator-{i}", 2) for i in range(3)])
    with pytest.raises(HostsError, match=r"^actors.generator.sglang_tp_size: generator-0's server needs 16 GPU"):
        assign(eight, [L("learner"), S("generator-0", 16)])
    with pytest.raises(HostsError, match=r"^actors.learner.ranks: 9 learner rank\(s\) on localhost need a GPU "
                                         r"each, it has 8"):
        assign(eight, [L("learner")] + [L(f"learner-rank-{r}") for r in range(1, 9)])
    # torch generators take a free GPU, else share round-robin; none on a GPU-less host
    got = assign([("a", 2), ("b", 0)], [L("learner", "a")] + [Demand(f"generator-{i}", "a", 1, "torch")
                                                              for i in range(3)] + [Demand("generator-9", "b", 1, "torch")])
    assert got["generator-0"] == (1,) and got["generator-1"] == (0,) and got["generator-2"] == (1,)
    assert got["generator-9"] == ()
    # two hosts: eight ranks fill the head, four TP-2 servers go to the other host
    two = [("node-a", 8), ("node-b", 8)]
    assert server_hosts(two, {"node-a": 8}, 2, 4) == ["node-b"] * 4
    assert server_hosts(two, {"node-a": 4}, 2, 4) == ["node-a", "node-b", "node-a", "node-b"]
    assert server_hosts(one, {"localhost": 1}, 1, 1, share_learner_gpu=True) == ["localhost"]


def test_inventory_comes_from_the_hostfile_the_knob_or_this_machine(monkeypatch):
    hosts = parse_hosts_text("localhost gpus=2\nnode-b slots=4\nnode-c gpus=0 slots=2\n")
    assert [h.gpus for h in hosts] == [2, None, 0]
    assert inventory(hosts, None, gpu_job=True) == [("localhost", 2), ("node-b", 4), ("node-c", 0)]
    assert inventory(hosts, 8, gpu_job=True) == [("localhost", 2), ("node-b", 8), ("node-c", 0)]
    assert inventory(hosts[1:], None, gpu_job=False) == [("node-b", 0), ("node-c", 0)]
    with pytest.raises(HostsError, match=r"<hosts>:1: bad gpus value 'x'"):
        parse_hosts_text("localhost gpus=x\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert local_gpus() == 2 and device_ids(Host("localhost"), 2) == ["4", "5"]
    assert device_ids(Host("node-b"), 2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpus() == 0


def _specs(overrides, hostfile=None, monkeypatch=None):
    from pathlib import Path

    from launcher.config import load_config
    from launcher.job.plan import process_specs
    from launcher.job.start import Start
    cfg = load_config(None, ["model.path=tiny", "ppo.bf16=false"] + overrides)
    hosts = parse_hosts_text(hostfile) if hostfile else None
    specs = process_specs(cfg, Path("c.yaml"), "tcp://127.0.0.1:5555", Start(0, "m"), hosts, 29500)
    return cfg, hosts, {s.name: s.env for s in specs}


def test_a_gpu_job_gives_every_process_its_devices_and_a_cpu_job_plans_as_before(monkeypatch):
    from launcher.job.plan import dry_run
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: this machine has no GPU
    # CPU job: slots as before, no NCCL settings, no devices for the learner
    _, _, env = _specs(["actors.learner.ranks=2", "actors.generator.count=2"])
    assert len(env["learner"].pop("BOBA_LEARNER_SECRET")) == 64  # the ranks' per-launch secret
    assert env["learner"] == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "2",
                              "CUDA_VISIBLE_DEVICES": "0", "BOBA_SLOT": "0", "BOBA_SLOTS": "1"}
    assert env["generator-1"] == {"CUDA_VISIBLE_DEVICES": "0", "BOBA_SLOT": "0", "BOBA_SLOTS": "1"}  # inert on a CPU
    with pytest.raises(HostsError, match="^model.device: cuda, but the learner's host localhost has no GPU"):
        _specs(["model.device=cuda"])
    # 8 GPUs, 4 ranks, two TP-2 servers: devices and NCCL settings in every process's environment
    cfg, hosts, env = _specs(["actors.learner.ranks=4", "actors.generator.backend=sglang", "actors.generator.count=2",
                              "actors.generator.sglang_tp_size=2"], "localhost gpus=8\n")
    assert [env[n]["CUDA_VISIBLE_DEVICES"] for n in ("learner", "learner-rank-1", "learner-rank-3",
                                                     "generator-0", "generator-1")] == ["0", "1", "3", "4,5", "6,7"]
    assert all(e["NCCL_CUMEM_ENABLE"] == "0" and e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2" for e in env.values()
               if "CUDA_VISIBLE_DEVICES" in e)
    assert env["generator-0"]["BOBA_SGLANG_KEY_FILE"].endswith("secrets/sglang_api_key")
    out = "\n".join(dry_run(cfg, hosts))
    assert "# generator-1 on localhost, GPUs 6,7 for its SGLang server (tp 2)" in out
    assert "# learner-rank-3 on localhost, learner rank 3 of 4 (group at 127.0.0.1:<free port>), GPU 3" in out
    # one GPU, shared only when asked (the config refuses it without a memory fraction)
    from policies.settings import ConfigError
    with pytest.raises((ConfigError, ValueError), match="actors.generator.sglang_mem_fraction_static"):
        _specs(["actors.generator.backend=sglang", "actors.generator.sglang_share_learner_gpu=true"])
    with pytest.raises(HostsError, match="^actors.generator.count: generator-0's server needs 1 free GPU"):
        _specs(["actors.gpus_per_host=1", "actors.generator.backend=sglang"])
    cfg, hosts, env = _specs(["actors.gpus_per_host=1", "actors.generator.backend=sglang",
                              "actors.generator.sglang_share_learner_gpu=true",
                              "actors.generator.sglang_mem_fraction_static=0.4"])
    assert env["learner"]["CUDA_VISIBLE_DEVICES"] == env["generator-0"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert ("GPU 0 for its SGLang server (tp 1, --mem-fraction-static 0.4), shared with learner rank 0"
            in "\n".join(dry_run(cfg, hosts)))
    # two hosts: the learner fills the head, the servers go to the second
    _, _, env = _specs(["actors.learner.ranks=8", "actors.generator.backend=sglang", "actors.generator.count=4",
                        "actors.generator.sglang_tp_size=2"], "localhost gpus=8\nnode-b gpus=8\n")
    assert [env[f"generator-{i}"]["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert env["learner-rank-7"]["CUDA_VISIBLE_DEVICES"] == "7"
