"""The launcher's sub-commands as a user types them: dry-run placement, config errors, keys, plot,
sft / eval / filter on a tiny random model.

Most commands run in this process through `launcher.__main__.main` (the same code path as
`python -m launcher`, minus a torch import per test); the dry-run goes through a real subprocess.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from policies.data.dataset import load_problems

from policies.data.prompts import build_prompt
from launcher.__main__ import main
from policies.data.prompts import DIRECTIVE
from launcher.mathdata import make_dataset
from launcher.job.metrics import MetricsWriter
from tests.launch_util import ROOT, launch


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny model saved as an HF directory with the SmolLM2 tokenizer (what --model takes)."""
    from policies.model.loading import load_tokenizer, save_checkpoint, smollm2_dir, tiny_model
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(tiny_model(seed=0), load_tokenizer(smollm2_dir()), out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=8, n_test=4, n_sft=6, seed=0)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- run --dry-run and its errors ------------------------------------------------------------

def _commands(stdout: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (host, argv) from the dry-run listing ("# NAME on HOST" then the command line)."""
    lines = stdout.splitlines()
    out = {}
    for i, line in enumerate(lines):
        if line.startswith("# ") and " on " in line:
            name, host = line[2:].split(", slot ")[0].split(" on ")
            out[name] = (host, shlex.split(lines[i + 1]))
    return out


def dry_run_on(capsys, tmp_path, data, hostfile: str, *overrides: str, command: tuple = ()) -> tuple[int, str, str]:
    """`--dry-run` of configs/tiny.yaml over tmp_path/hosts.txt holding `hostfile`, with `-o` `overrides`
    and the data fixture's train set (no test set)."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(hostfile)
    return run_cli(capsys, *command, "--dry-run", "--hosts", str(hosts), "--config", "configs/tiny.yaml",
                   *(a for o in overrides for a in ("-o", o)), "-o", f"data.train={data['train']}",
                   "-o", "data.test=null")


def test_dry_run_wraps_only_remote_actors_in_ssh(tmp_path, data):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# head node first\nlocalhost slots=1\nalice@node-7 slots=2   # two GPUs\n")
    run_dir = tmp_path / "run"
    r = launch(["--dry-run", "--hosts", str(hosts), "--config", "configs/tiny.yaml",
                "-o", "bus.host=10.0.0.5", "-o", "bus.port=6000", "-o", "actors.generator.count=3",
                "-o", f"bus.keys_dir={tmp_path / 'keys'}",  # a bus beyond loopback needs keys, in --dry-run too
                "-o", f"run_dir={run_dir}", "-o", f"data.train={data['train']}", "-o", "data.test=null"],
               timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("# mode: synchronous (max_staleness=0)\n")
    broker = shlex.split(r.stdout.splitlines()[1])
    assert broker[:3] == [sys.executable, "-m", "bus.broker"] and "tcp://10.0.0.5:6000" in broker

    cmds = _commands(r.stdout)
    assert set(cmds) == {"sampler", "packer", "learner", "verifier-0", "generator-0", "generator-1", "generator-2"}
    remote = {n for n, (host, _) in cmds.items() if host == "node-7"}
    assert len(remote) == 2 and remote < {"generator-0", "generator-1", "generator-2"}  # by slots: 2 of 3
    devices = {}
    for name, (host, argv) in cmds.items():
        if host == "node-7":
            assert argv[0] == "ssh" and "BatchMode=yes" in argv and argv[-2] == "alice@node-7"
            assert "-tt" in argv   # a remote terminal: the remote actor ends with its ssh
            inner = shlex.split(argv[-1])
            assert inner[:3] == ["cd", str(ROOT), "&&"]
            env, actor = inner[3:inner.index("exec")], inner[inner.index("exec") + 1:]
        else:
            assert host == "localhost" and "ssh" not in argv
            env, actor = (argv[1:argv.index(sys.executable)], argv[argv.index(sys.executable):]) \
                if argv[0] == "env" else ([], argv)
        env = dict(kv.split("=", 1) for kv in env if kv.startswith(("CUDA_", "BOBA_SLOT")))
        if name.startswith("generator"):  # each generator of a host on its own device (slot)
            assert env["BOBA_SLOTS"] == ("2" if host == "node-7" else "1")
            devices.setdefault(host, []).append(env["CUDA_VISIBLE_DEVICES"])
        else:
            assert env == {}
        assert actor[:5] == [sys.executable, "-m", "launcher", "actor", name.split("-")[0]]
        assert actor[actor.index("--name") + 1] == name
        assert actor[actor.index("--bus") + 1] == "tcp://10.0.0.5:6000"
        # an absolute config path: the actor starts in the project directory, maybe on another host
        assert actor[actor.index("--config") + 1] == str(run_dir / "config.yaml")
    assert sorted(devices["node-7"]) == ["0", "1"] and devices["localhost"] == ["0"]
    assert not run_dir.exists(), "a dry run started something"


@pytest.mark.parametrize("bus_host", ["127.0.0.1", "localhost", "127.0.1.1"])
def test_remote_hosts_need_a_reachable_bus(tmp_path, data, capsys, bus_host):
    rc, out, err = dry_run_on(capsys, tmp_path, data, "localhost\nnode-7 slots=4\n", f"bus.host={bus_host}",
                              command=("run",))
    hosts = tmp_path / "hosts.txt"
    assert rc == 2 and out == ""
    assert f"{hosts} names remote hosts but bus.host is {bus_host}" in err and "bus.keys_dir" in err


def test_generators_beside_the_learner_leave_it_gpu_0(tmp_path, data, capsys):
    rc, out, _ = dry_run_on(capsys, tmp_path, data, "localhost slots=8\n", "actors.generator.count=7")
    assert rc == 0
    gpus = sorted(a.split("=")[1] for _, argv in _commands(out).values() for a in argv
                  if a.startswith("CUDA_VISIBLE_DEVICES="))
    assert gpus == [str(k) for k in range(1, 8)]


def test_dry_run_shows_the_learner_ranks_their_group_and_devices(tmp_path, data, capsys):
    rc, out, _ = dry_run_on(capsys, tmp_path, data, "localhost slots=4\nnode-7 slots=2\n", "actors.learner.ranks=3",
                            "actors.learner.hosts=[localhost, localhost, node-7]", "actors.learner.dist_port=29999",
                            "actors.generator.count=2", "bus.host=10.0.0.5", f"bus.keys_dir={tmp_path / 'keys'}")
    assert rc == 0
    assert "# learner on localhost, learner rank 0 of 3 (group at 10.0.0.5:29999)" in out
    assert "# learner-rank-1 on localhost, learner rank 1 of 3" in out
    assert "# learner-rank-2 on node-7, learner rank 2 of 3" in out
    lines = out.splitlines()
    envs = {}
    for i, line in enumerate(lines):
        if line.startswith("# "):
            argv = shlex.split(lines[i + 1])
            argv = shlex.split(argv[-1]) if argv[0] == "ssh" else argv  # a remote one: its env inline
            envs[line[2:].split(" on ")[0]] = dict(kv.split("=", 1) for kv in argv
                                                   if "=" in kv and kv.split("=")[0].isupper())
    for rank, name in enumerate(["learner", "learner-rank-1", "learner-rank-2"]):
        env = envs[name]
        assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
            (str(rank), "3", "10.0.0.5", "29999"), name
    # the two local ranks take GPUs 0 and 1, the local generator the next; rank 2 takes node-7's GPU 0
    assert [envs[n]["CUDA_VISIBLE_DEVICES"] for n in ("learner", "learner-rank-1", "learner-rank-2")] == ["0", "1", "0"]
    local_gen = [envs[n]["CUDA_VISIBLE_DEVICES"] for n in ("generator-0", "generator-1")
                 if f"# {n} on localhost" in out]
    assert all(d not in ("0", "1") for d in local_gen)


def test_all_local_hostfile_needs_no_ssh(tmp_path, data, capsys):
    rc, out, _ = dry_run_on(capsys, tmp_path, data, "localhost slots=2\n", "actors.generator.count=2")
    assert rc == 0
    cmds = _commands(out)
    assert {"generator-0", "generator-1"} <= set(cmds)
    assert all(host == "localhost" and argv[0] != "ssh" for host, argv in cmds.values())


def test_bad_hostfile_line_names_file_and_line(tmp_path, data, capsys):
    rc, out, err = dry_run_on(capsys, tmp_path, data, "# cluster\nlocalhost slots=1\nnode-1 slots=zero\n")
    hosts = tmp_path / "hosts.txt"
    assert rc == 2 and out == ""
    assert f"error: {hosts}:3: bad slots value 'zero'" in err
    rc, _, err = run_cli(capsys, "--dry-run", "--hosts", str(tmp_path / "missing.txt"), "--config", "configs/tiny.yaml",
                         "-o", f"data.train={data['train']}", "-o", "data.test=null")
    assert rc == 2 and "missing.txt: cannot read hostfile" in err


def test_bad_config_key_names_the_key(tmp_path, data, capsys):
    rc, out, err = run_cli(capsys, "--dry-run", "--config", "configs/tiny.yaml", "-o", "rollout.max_stalenes=2",
                           "-o", f"data.train={data['train']}")
    assert rc == 2 and out == ""
    assert "rollout.max_stalenes: unknown key" in err and "rollout.max_staleness" in err

    exp = tmp_path / "exp.yaml"
    exp.write_text("rollout:\n  top_p: 1.5\n")
    rc, _, err = run_cli(capsys, "config", "--config", str(exp))
    assert rc == 2 and "rollout.top_p" in err and "1.5" in err

    rc, _, err = run_cli(capsys, "--dry-run", "--config", "configs/tiny.yaml", "-o", "data.train=/nonexistent/t.jsonl")
    assert rc == 2 and "data.train" in err and "/nonexistent/t.jsonl" in err


def test_config_prints_the_effective_mode(capsys):
    rc, out, _ = run_cli(capsys, "config", "--config", "configs/tiny.yaml", "-o", "rollout.max_staleness=2")
    assert rc == 0
    assert out.splitlines()[0] == "# mode: asynchronous (max_staleness=2)"
    effective = yaml.safe_load(out)
    assert effective["rollout"]["max_staleness"] == 2 and effective["name"] == "tiny"
    rc, out, _ = run_cli(capsys, "config", "--config", "configs/tiny.yaml")
    assert rc == 0 and out.splitlines()[0] == "# mode: synchronous (max_staleness=0)"


def test_status_of_a_bus_nobody_serves_is_a_bounded_error(capsys):
    import socket
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run_cli(capsys, "status", "--bus", f"tcp://127.0.0.1:{port}")
    assert rc == 2 and f"could not list the actors on tcp://127.0.0.1:{port}" in err and "timed out" in err


# --- keys, plot --------------------------------------------------------------------------------

def test_keys_refuses_to_overwrite_without_force(tmp_path, capsys):
    from bus.keys import load_keys
    d = tmp_path / "keys"
    rc, out, _ = run_cli(capsys, "keys", str(d))
    assert rc == 0 and str(d) in out
    files = sorted(p.name for p in d.iterdir())
    assert files and any(f.endswith("_secret") for f in files)
    before = {f: (d / f).read_bytes() for f in files}
    keys = load_keys(d)
    assert keys.server_public and keys.pair_for("generator")

    rc, _, err = run_cli(capsys, "keys", str(d))
    assert rc == 2 and "already exist" in err
    assert {f: (d / f).read_bytes() for f in files} == before, "a refused call changed the keys"

    rc, _, _ = run_cli(capsys, "keys", str(d), "--force")
    assert rc == 0 and load_keys(d).server_public != keys.server_public


def test_plot_writes_a_png(tmp_path, capsys):
    from matplotlib.image import imread
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir, tensorboard=False) as w:
        for step in range(4):
            w.write(step, {"reward_mean": -5.0 + step, "accuracy": step / 4, "truncation_rate": 1 - step / 4,
                           "tokens_per_s": 100.0 + step})
    rc, out, _ = run_cli(capsys, "plot", str(run_dir))
    png = run_dir / "metrics.png"
    assert rc == 0 and out.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w_, _ = imread(png).shape
    assert h > 100 and w_ > 100

    rc, _, err = run_cli(capsys, "plot", str(tmp_path / "no-such-run"))
    assert rc == 2 and "no-such-run" in err


# --- sft, eval, filter on the tiny model -------------------------------------------------------

def test_sft_writes_a_loadable_checkpoint_with_new_weights(tmp_path, tiny_dir, data, capsys):
    from transformers import AutoModelForCausalLM
    out_dir = tmp_path / "sft"
    rc, out, _ = run_cli(capsys, "sft", "--data", str(data["sft"]), "--model", str(tiny_dir), "--out", str(out_dir),
                         "--epochs", "1", "--batch-size", "3", "--lr", "1e-3")
    assert rc == 0, out
    assert "SFT done: 2 steps" in out     # 6 pairs / batch 3 x 1 epoch
    trained = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    base = load_file(str(tiny_dir / "model.safetensors"))
    changed = [k for k, v in base.items() if not torch.equal(v, trained[k])]
    assert changed, "SFT left every weight unchanged"
    assert (out_dir / "tokenizer.json").exists()

    rc, _, err = run_cli(capsys, "sft", "--data", str(tmp_path / "none.jsonl"), "--model", str(tiny_dir),
                         "--out", str(tmp_path / "x"))
    assert rc == 2 and "none.jsonl" in err and not (tmp_path / "x").exists()


def test_eval_prints_a_table_and_writes_json(tmp_path, tiny_dir, data, capsys):
    res = tmp_path / "eval.json"
    rc, out, _ = run_cli(capsys, "eval", "--data", str(data["test"]), "--model", str(tiny_dir), "-k", "2",
                         "--max-new-tokens", "8", "--limit", "3", "--temperature", "0.7", "--top-p", "0.9",
                         "--out", str(res))
    assert rc == 0, out
    header, row = out.splitlines()[:2]
    assert header.split() == ["model", "problems", "k", "pass@1", "truncated"]
    assert row.split()[1:3] == ["3", "2"]
    r = json.loads(res.read_text())
    assert r["k"] == 2 and r["problems"] == 3 and 0.0 <= r["pass@1"] <= 1.0
    assert float(row.split()[3]) == pytest.approx(r["pass@1"], abs=1e-3)
    assert (r["temperature"], r["top_p"]) == (0.7, 0.9)
    test_ids = [p.id for p in load_problems(data["test"])][:3]
    assert [p["id"] for p in r["per_problem"]] == test_ids
    assert all(p["k"] == 2 and 0 <= p["correct"] <= 2 for p in r["per_problem"])

    rc, _, err = run_cli(capsys, "eval", "--data", str(data["test"]), "--model", str(tiny_dir), "-k", "0")
    assert rc == 2 and "-k: expected an integer >= 1, got 0" in err


def test_force_newline_appends_a_newline_token(tiny_dir, tmp_path, data, capsys):
    from policies.model.loading import load_tokenizer
    tok = load_tokenizer(tiny_dir)
    plain = build_prompt(tok, "What is 2 + 3?", DIRECTIVE)
    forced = build_prompt(tok, "What is 2 + 3?", DIRECTIVE, force_newline=True)
    assert forced[:len(plain)] == plain and len(forced) > len(plain)
    assert tok.decode(forced[len(plain):]) == "\n"
    assert tok.decode(forced) == tok.decode(plain) + "\n"   # the assistant turn's text starts with "\n"
    res = tmp_path / "eval.json"
    rc, out, _ = run_cli(capsys, "eval", "--data", str(data["test"]), "--model", str(tiny_dir), "-k", "1",
                         "--max-new-tokens", "4", "--limit", "1", "--force-newline", "--out", str(res))
    assert rc == 0, out
    assert json.loads(res.read_text())["problems"] == 1


def test_filter_keeps_problems_never_always_solved(tmp_path, tiny_dir, data, capsys):
    out_path = tmp_path / "hard.jsonl"
    rc, out, _ = run_cli(capsys, "filter", "--data", str(data["test"]), "--model", str(tiny_dir), "-k", "2",
                         "--max-new-tokens", "8", "--out", str(out_path))
    assert rc == 0, out
    src = [json.loads(line) for line in data["test"].read_text().splitlines()]
    kept = [json.loads(line) for line in out_path.read_text().splitlines()]
    # a random model solves nothing in 8 tokens, so every problem carries a signal and is kept, as written
    assert kept == src
    assert f"kept {len(src)} of {len(src)} problems" in out


@pytest.mark.parametrize("command", ["sft", "eval", "filter"])
def test_a_missing_model_is_an_error_naming_it(command, tmp_path, data, capsys):
    out = [] if command == "eval" else ["--out", str(tmp_path / "out")]
    rc, _, err = run_cli(capsys, command, "--data", str(data["sft" if command == "sft" else "test"]),
                         "--model", str(tmp_path / "no-such-model"), *out)
    assert rc == 2 and "no-such-model" in err
    assert not (tmp_path / "out").exists()
