"""Scale, by simulation: the real control plane with simulated compute, 1 to 512 generators.

Every cell is a real job through the launcher (broker, sampler, verifier pool, packer, learner with its
weight broadcaster, tensor channels, all real processes) whose generators and learner sleep what the
cost model (policies.cost_model) says: generator backend ``sim`` (several per process, each its own
actor with its own bus connection) and learner mode ``sim``. Per cell it prints, over the steady
steps (after --warmup):

  steps/min against the cost model's ideal (max(generate, train) + sync; with max_staleness 0 the
  synchronous sum: the expected makespan of a batch + train + sync), the learner's and the generators'
  idle fractions, the broker's messages per second and CPU (share of one core, /proc/PID/stat), the
  p99 round trip of a control request to the sampler through the broker (a probe client asks every
  100 ms) and of a broker listing, the sampler's and packer's peak RSS, and the machine's load.

The cost model is balanced (a batch's expected makespan == its training time), and scaled so an ideal
step takes max(--min-step, --step-per-gen x generators) seconds; every batch has one group per
generator (at least 8 groups), and a generator's decode step costs the same up to 64 running
sequences (the memory-bound regime), so a batch's time is set by its longest responses.

    python bench/scale.py --quick                        # 1, 64, 512 generators x staleness 0, 1
    python bench/scale.py                                # 1, 8, 64, 256, 512 x 0, 1, 2, 4
    python bench/scale.py --generators 64 --staleness 1 --interrupt   # interrupt_on_update on and off
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from policies.cost_model import CostModel  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
STATS = re.compile(r"stats at ([\d.]+): received (\d+) routed (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mean_prompt_tokens(train: Path, limit: int = 64) -> float:
    from policies.data.dataset import load_problems
    from policies.data.prompts import build_prompt
    from policies.data.prompts import DIRECTIVE
    from policies.model.loading import load_tokenizer, smollm2_dir
    tok = load_tokenizer(smollm2_dir())
    probs = load_problems(train)[:limit]
    return sum(len(build_prompt(tok, p.prompt, DIRECTIVE, False)) for p in probs) / len(probs)


def cell_cost(args, generators: int, prompt_tokens: float) -> tuple[CostModel, int, float]:
    """(cost model, batch prompts, ideal async step seconds): balanced and scaled for this cell."""
    batch = max(8, generators)
    g = args.group_size
    base = dict(decode_step_s=0.03, max_running=64, response_median=args.median,
                response_sigma=args.sigma, max_response_tokens=27000, token_scale=args.token_scale,
                prefill_s_per_token=2e-5, weight_gb=14.0, accuracy=0.5)
    probe = CostModel(**base, learner_s_per_token=1.0, sync_s_per_gb=0.0)
    parts = probe.ideal(batch_prompts=batch, group_size=g, generators=generators, prompt_tokens=round(prompt_tokens),
                        max_staleness=1)
    gen, tokens = parts["generate"], parts["train"]  # train: seconds at 1 s per token = tokens
    target = max(args.min_step, args.step_per_gen * generators)
    scale = target / (gen * (1 + args.sync_frac))
    cost = CostModel(**base, learner_s_per_token=gen * args.balance / tokens,
                     sync_s_per_gb=args.sync_frac * gen / 14.0, time_scale=scale)
    return cost, batch, target


class Monitor(threading.Thread):
    """Samples the job's processes twice a second: broker CPU ticks, sampler/packer RSS, load."""

    def __init__(self, run_dir: Path, port: int):
        super().__init__(daemon=True)
        self.marker, self.port = str(run_dir), f":{port}"
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def _procs(self) -> dict[str, int]:
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            cmd = [a.decode(errors="replace") for a in argv]
            if "bus.broker" in cmd and any(a.endswith(self.port) for a in cmd):
                found["broker"] = int(d.name)
            elif "actor" in cmd and any(self.marker in a for a in cmd):
                role = cmd[cmd.index("actor") + 1]
                if role in ("sampler", "packer"):
                    found[role] = int(d.name)
        return found

    def run(self) -> None:
        while not self.stop.wait(0.5):
            s = {"t": time.time(), "load": os.getloadavg()[0]}
            for role, pid in self._procs().items():
                try:
                    if role == "broker":
                        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        s["broker_ticks"] = int(f[11]) + int(f[12])
                    else:
                        kb = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
                        s[f"{role}_rss"] = int(kb.group(1)) / 1024
                except (OSError, AttributeError):
                    pass
            self.samples.append(s)


class Probe(threading.Thread):
    """A bus client that times a control request to the sampler, and a broker listing, every 100 ms."""

    def __init__(self, address: str, heartbeat: float):
        super().__init__(daemon=True)
        self.address, self.heartbeat = address, heartbeat
        self.sampler: list[tuple[float, float]] = []
        self.broker: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._go())

    async def _go(self) -> None:
        from actors import protocol as P
        from bus.client import BusClient
        client = BusClient(self.address, f"probe-{os.getpid()}", "tool", heartbeat_interval=self.heartbeat)
        while not self.stop.is_set():
            try:
                await client.connect(timeout=5.0)
                break
            except Exception:
                client = BusClient(self.address, f"probe-{os.getpid()}", "tool", heartbeat_interval=self.heartbeat)
                await asyncio.sleep(1.0)
        try:
            while not self.stop.is_set():
                await asyncio.sleep(0.1)
                for kind, call in (("sampler", lambda: client.request(P.SAMPLER, P.SAMPLER_STATE, {}, timeout=5.0)),
                                   ("broker", lambda: client.actors(role="learner", timeout=5.0))):
                    t0 = time.perf_counter()
                    try:
                        await call()
                    except Exception:
                        continue
                    getattr(self, kind).append((time.time(), time.perf_counter() - t0))
        finally:
            await client.close()


def at(series: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation of a (time, cumulative value) series at t."""
    if t <= series[0][0]:
        return series[0][1]
    for (t0, v0), (t1, v1) in zip(series, series[1:]):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / max(1e-9, t1 - t0)
    return series[-1][1]


def p99(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]


def run_cell(args, generators: int, staleness: int, interrupt: bool, data: Path, prompt_tokens: float) -> dict:
    cost, batch, _ = cell_cost(args, generators, prompt_tokens)
    ideal = cost.ideal(batch_prompts=batch, group_size=args.group_size, generators=generators,
                       prompt_tokens=round(prompt_tokens), max_staleness=staleness)
    per_process = max(1, math.ceil(generators / args.processes))
    cell = Path(args.out) / f"g{generators}-k{staleness}-i{int(interrupt)}"
    run_dir = cell / "run"
    if cell.exists():
        import shutil
        shutil.rmtree(cell)
    cell.mkdir(parents=True)
    port = free_port()
    steps = args.warmup + args.steps + staleness  # the last k steps drain (no batch left to admit): not measured
    cfg = {
        "name": cell.name, "run_dir": str(run_dir), "seed": 1,
        "model": {"path": "tiny", "dtype": "float32", "device": "cpu"},
        "data": {"train": str(data), "test": None, "max_prompt_tokens": 256},
        "rollout": {"batch_prompts": batch, "group_size": args.group_size, "max_staleness": staleness,
                    "interrupt_on_update": interrupt},
        "train": {"steps": steps, "checkpoint_every": 0, "keep_checkpoints": 1},
        "actors": {"generator": {"backend": "sim", "count": generators, "per_process": per_process},
                   "learner": {"mode": "sim"}},
        "verifier": {"workers": 1},
        "bus": {"port": port, "heartbeat_interval": args.heartbeat, "stats_every": 1.0},
        "sim": {k: getattr(cost, k) for k in cost.__dataclass_fields__},
    }
    (cell / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BOBA_TORCH_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    mon, probe = Monitor(run_dir, port), Probe(f"tcp://127.0.0.1:{port}", args.heartbeat)
    t_start = time.time()
    log = open(cell / "launcher.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "--quiet", "--config", str(cell / "config.yaml")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    mon.start()
    probe.start()
    limit = 240 + steps * ideal["step"] * 4
    try:
        rc = proc.wait(limit)
    except BaseException as exc:  # a timeout, or Ctrl-C: the launcher stops its job (a second signal: at once)
        rc = f"timeout after {limit:.0f} s" if isinstance(exc, subprocess.TimeoutExpired) else "interrupted"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        if rc == "interrupted":
            raise
    finally:
        mon.stop.set()
        probe.stop.set()
        log.close()
    probe.join(10)
    row = {"generators": generators, "processes": math.ceil(generators / per_process), "staleness": staleness,
           "interrupt": interrupt, "batch": batch, "ideal_step_s": ideal["step"], "ideal": ideal,
           "wall_s": time.time() - t_start, "rc": rc}
    if rc != 0:
        row["error"] = (cell / "launcher.out").read_text()[-1500:]
        return row
    return {**row, **measure(args, run_dir, mon, probe, ideal)}


def measure(args, run_dir: Path, mon: Monitor, probe: Probe, ideal: dict) -> dict:
    recs = sorted((json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()),
                  key=lambda r: r["step"])
    first, last = recs[args.warmup - 1], recs[args.warmup - 1 + args.steps]
    window = [r for r in recs if first["step"] < r["step"] <= last["step"]]
    ta, tb = first["time"], last["time"]
    span = tb - ta
    spm = 60 * len(window) / span
    busy = sum(r.get("time_recv_s", 0) + r.get("time_train_s", 0) + r.get("time_sync_s", 0) for r in window)
    gens, mixed, finished = [], 0, 0
    for f in (run_dir / "sim").glob("*.json"):
        rep = json.loads(f.read_text())
        mixed, finished = mixed + rep["mixed"], finished + rep["finished"]
        series = [(t, b) for t, b, _ in rep["samples"]]
        gens.append((at(series, tb) - at(series, ta)) / span)
    ticks = [(s["t"], s["broker_ticks"]) for s in mon.samples if "broker_ticks" in s]
    counts = []
    for line in (run_dir / "logs" / "broker.log").read_text().splitlines():
        if m := STATS.search(line):
            counts.append((float(m.group(1)), int(m.group(2))))
    inside = [s for s in mon.samples if ta <= s["t"] <= tb]
    return {
        "steps_per_min": spm, "ideal_per_min": 60 / ideal["step"], "ratio": spm * ideal["step"] / 60,
        "learner_idle": max(0.0, 1 - busy / span),  # its timers may overlap the window's ends
        "generator_idle": 1 - sum(gens) / max(1, len(gens)),
        "broker_msgs_s": (at(counts, tb) - at(counts, ta)) / span if len(counts) > 1 else float("nan"),
        "broker_cpu": (at(ticks, tb) - at(ticks, ta)) / CLK_TCK / span if len(ticks) > 1 else float("nan"),
        "p99_sampler_ms": 1000 * p99([d for t, d in probe.sampler if ta <= t <= tb]),
        "p99_broker_ms": 1000 * p99([d for t, d in probe.broker if ta <= t <= tb]),
        "sampler_rss_mib": max((s.get("sampler_rss", 0) for s in inside), default=float("nan")),
        "packer_rss_mib": max((s.get("packer_rss", 0) for s in inside), default=float("nan")),
        "load": sum(s["load"] for s in inside) / max(1, len(inside)),
        "mixed_version_seqs": mixed / max(1, finished), "steps_measured": len(window),
    }


HEADER = (f"{'gens':>5} {'procs':>5} {'k':>2} {'intr':>4} {'steps/min':>9} {'ideal':>7} {'ratio':>6} "
          f"{'L idle':>6} {'G idle':>6} {'msg/s':>7} {'brk cpu':>7} {'p99 smp':>8} {'p99 brk':>8} "
          f"{'smp MiB':>7} {'pck MiB':>7} {'mixed':>6} {'load':>5}")


def fmt(r: dict) -> str:
    head = f"{r['generators']:>5} {r['processes']:>5} {r['staleness']:>2} {('on' if r['interrupt'] else 'off'):>4}"
    if "ratio" not in r:
        return f"{head} FAILED ({r['rc']}): {r.get('error', '')[-300:]!r}"
    return (f"{head} {r['steps_per_min']:>9.2f} {r['ideal_per_min']:>7.2f} {r['ratio']:>6.1%} "
            f"{r['learner_idle']:>6.1%} {r['generator_idle']:>6.1%} {r['broker_msgs_s']:>7.0f} "
            f"{r['broker_cpu']:>7.1%} {r['p99_sampler_ms']:>6.1f}ms {r['p99_broker_ms']:>6.1f}ms "
            f"{r['sampler_rss_mib']:>7.0f} {r['packer_rss_mib']:>7.0f} {r['mixed_version_seqs']:>6.1%} "
            f"{r['load']:>5.1f}")


def goals(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "ratio" not in r:
            continue
        n, k = r["generators"], r["staleness"]
        if k >= 1 and n in (64, 512):
            want = 0.9 if n == 64 else 0.8
            out.append(f"{'PASS' if r['ratio'] >= want else 'MISS'}: {n} generators, staleness {k}: "
                       f"{r['ratio']:.1%} of ideal (goal >= {want:.0%})")
        if k == 0:
            out.append(f"{'PASS' if r['ratio'] >= 0.9 else 'MISS'}: {n} generators, synchronous: {r['ratio']:.1%} "
                       f"of the synchronous expectation (goal ~100%)")
        if n == 512:
            out.append(f"{'PASS' if r['broker_cpu'] < 0.25 else 'MISS'}: broker CPU at 512: {r['broker_cpu']:.1%} "
                       f"of a core (goal < 25%)")
        out.append(f"{'PASS' if r['p99_sampler_ms'] < 50 else 'MISS'}: p99 control latency at {n}/k{k}: "
                   f"{r['p99_sampler_ms']:.1f} ms (goal < 50 ms)")
    return out


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    ok = [r for r in rows if "ratio" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (k, intr) in sorted({(r["staleness"], r["interrupt"]) for r in ok}):
        rs = sorted((r for r in ok if r["staleness"] == k and r["interrupt"] == intr), key=lambda r: r["generators"])
        xs = [r["generators"] for r in rs]
        label = f"staleness {k}" + ("" if intr else " (no interrupt)")
        axes[0].plot(xs, [100 * r["ratio"] for r in rs], "o-", label=label)
        axes[1].plot(xs, [100 * r["broker_cpu"] for r in rs], "o-", label=label)
        axes[2].plot(xs, [r["p99_sampler_ms"] for r in rs], "o-", label=label)
    for ax, title in zip(axes, ("steps/min, % of the cost model's ideal", "broker CPU, % of one core",
                                "p99 control round trip to the sampler, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("simulated generators")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1, 64, 512 generators x staleness 0, 1")
    ap.add_argument("--generators", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--staleness", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--interrupt", action="store_true", help="each cell with interrupt_on_update on and off")
    ap.add_argument("--steps", type=int, default=6, help="steady steps measured per cell")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--median", type=float, default=2000.0, help="response length median, simulated tokens")
    ap.add_argument("--sigma", type=float, default=0.5, help="log-normal sigma of response lengths (the tail)")
    ap.add_argument("--token-scale", type=int, default=100, help="simulated tokens per emitted token")
    ap.add_argument("--balance", type=float, default=1.0, help="training time / generation time")
    ap.add_argument("--sync-frac", type=float, default=0.05, help="weight sync time / generation time")
    ap.add_argument("--min-step", type=float, default=3.0, help="ideal seconds per step, at least")
    ap.add_argument("--step-per-gen", type=float, default=0.02, help="ideal seconds per step per generator")
    ap.add_argument("--processes", type=int, default=4, help="generator processes, at most")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="bus.heartbeat_interval (the default: 1 s)")
    ap.add_argument("--out", default="runs/bench-scale")
    args = ap.parse_args(argv)
    gens = args.generators or ([1, 64, 512] if args.quick else [1, 8, 64, 256, 512])
    stal = args.staleness or ([0, 1] if args.quick else [0, 1, 2, 4])
    intrs = [True, False] if args.interrupt else [True]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from launcher.mathdata import make_dataset
    make_dataset(out / "data", n_train=max(1024, 2 * max(gens)), n_test=4, n_sft=4, seed=0)
    data = out / "data" / "train.jsonl"
    prompt_tokens = mean_prompt_tokens(data)
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; mean prompt {prompt_tokens:.0f} tokens; "
          f"group size {args.group_size}, one group per generator per batch (>= 8); response lengths log-normal "
          f"median {args.median:.0f} sigma {args.sigma} cap 27000, {args.token_scale} simulated tokens per emitted "
          f"token; generators share at most {args.processes} processes", flush=True)
    rows = []
    print(HEADER, flush=True)
    for n in gens:
        for k in stal:
            for intr in intrs:
                r = run_cell(args, n, k, intr, data, prompt_tokens)
                rows.append(r)
                print(fmt(r) + f"   ({r['wall_s']:.0f} s, ideal step {r['ideal_step_s']:.2f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    print()
    print(HEADER)
    print("\n".join(fmt(r) for r in rows))
    print("\n".join(goals(rows)))
    print(plot(rows, out / "scale.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
