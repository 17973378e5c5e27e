"""Soak: run the tiny-model job for 300+ steps and check that no actor process grows.

Growth a short test never sees (a list appended every step, an fd or a /dev/shm segment leaked per
transfer) shows after hundreds of steps.  This runs the launcher as a subprocess on configs/tiny.yaml
with a generated arithmetic dataset, and at steps --early and --late reads, for every process under
the launcher (broker, actors, their workers; named by their command line, as in run_dir/logs):

* RSS (VmRSS of /proc/PID/status), open fds (entries of /proc/PID/fd),
* /dev/shm entries `boba-*` whose name carries the pid (the shm channel's segments).

It prints one table per sample and the growth per process, and exits 1 when a bound is passed:
RSS may grow by at most --rss-ratio x (and --rss-slack-mib, for the small processes whose
allocator settles late), fds by --fd-growth, shm segments by --shm-growth.

    python bench/soak.py                    # 320 steps, samples at 50 and 300: a few minutes on 2 cores
    python bench/soak.py --steps 120 --early 20 --late 100   # a quicker look
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.mathdata import make_dataset  # noqa: E402
from tests.live_job import descendants  # noqa: E402

SHM_DIR = "/dev/shm"


def process_name(pid: int) -> str | None:
    """The actor's --name (as its log file in run_dir/logs is called), "broker", or None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "--name" in argv:
        return argv[argv.index("--name") + 1]
    return "broker" if "bus.broker" in argv else None


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def sample(launcher_pid: int) -> dict[str, dict]:
    """name -> {pid, rss_mib, fds, shm} of every process under the launcher (the launcher too)."""
    shm = os.listdir(SHM_DIR) if os.path.isdir(SHM_DIR) else []
    out: dict[str, dict] = {}
    names = {launcher_pid: "launcher"}
    for pid in descendants(launcher_pid):  # parents come first: a worker is named after its actor
        names[pid] = process_name(pid) or f"{names.get(parent(pid), '?')}/worker"
    for pid in names:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # exited meanwhile
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        name = names[pid]
        if name in out:  # e.g. a verifier's pool workers
            name = f"{name}-{sum(n.startswith(name) for n in out)}"
        out[name] = {"pid": pid, "rss_mib": int(m.group(1)) / 1024 if m else 0.0, "fds": fds,
                     "shm": sum(1 for f in shm if f.startswith("boba-") and f"-{pid}-" in f)}
    return out


def table(title: str, snap: dict[str, dict]) -> str:
    lines = [title, f"  {'process':<28}{'pid':>8}{'RSS MiB':>10}{'fds':>6}{'shm':>5}"]
    for name, s in sorted(snap.items()):
        lines.append(f"  {name:<28}{s['pid']:>8}{s['rss_mib']:>10.1f}{s['fds']:>6}{s['shm']:>5}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=320, help="steps the job runs (the late sample must come before)")
    ap.add_argument("--early", type=int, default=50, help="step of the first sample")
    ap.add_argument("--late", type=int, default=300, help="step of the second sample")
    ap.add_argument("--rss-ratio", type=float, default=1.25, help="largest RSS growth allowed, late / early")
    ap.add_argument("--rss-slack-mib", type=float, default=24.0, help="RSS growth always allowed, in MiB")
    ap.add_argument("--fd-growth", type=int, default=8, help="most open fds a process may gain")
    ap.add_argument("--shm-growth", type=int, default=2, help="most /dev/shm segments a process may gain")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the soak gives up")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data and run directory")
    args = ap.parse_args()
    if not 0 < args.early < args.late < args.steps:
        ap.error("need 0 < --early < --late < --steps")
    tmp = Path(tempfile.mkdtemp(prefix="boba-soak-"))
    try:
        return soak(args, tmp)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def soak(args: argparse.Namespace, tmp: Path) -> int:
    make_dataset(tmp / "data", n_train=64, n_test=4, n_sft=4, seed=0)
    run_dir = tmp / "run"
    sets = {"run_dir": run_dir, "data.train": tmp / "data" / "train.jsonl", "data.test": "null",
            "train.steps": args.steps, "train.checkpoint_every": 100, "train.keep_checkpoints": 1,
            "rollout.batch_prompts": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 8,
            "bus.heartbeat_interval": 1.0}
    argv = [sys.executable, "-m", "launcher", "run", "--config", "configs/tiny.yaml", "--quiet"]
    for k, v in sets.items():
        argv += ["-o", f"{k}={v}"]
    print("soak settings:", " ".join(f"{k}={v}" for k, v in sets.items()), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BOBA_TORCH_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    progress = {"step": -1}
    tail: list[str] = []

    def pump() -> None:  # the launcher prints "[progress] step N/M" once step N-1 is trained
        for line in proc.stdout:
            tail[:] = (tail + [line.rstrip()])[-30:]
            m = re.search(r"\[progress\] step (\d+)/", line)
            if m:
                progress["step"] = int(m.group(1))

    threading.Thread(target=pump, daemon=True).start()
    t0 = time.monotonic()
    snaps: dict[int, dict] = {}
    try:
        for at in (args.early, args.late):
            while progress["step"] < at:
                if proc.poll() is not None:
                    print("\n".join(tail))
                    print(f"soak: the job exited with code {proc.returncode} before step {at}")
                    return 1
                if time.monotonic() - t0 > args.timeout:
                    print("\n".join(tail))
                    print(f"soak: step {at} not reached within {args.timeout:.0f} s (at step {progress['step']})")
                    return 1
                time.sleep(0.2)
            snaps[at] = sample(proc.pid)
            print(table(f"step {at} ({time.monotonic() - t0:.0f} s):", snaps[at]), flush=True)
        rc = proc.wait(timeout=max(60.0, args.timeout - (time.monotonic() - t0)))
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    print(f"job finished with code {rc} after {time.monotonic() - t0:.0f} s")

    early, late = snaps[args.early], snaps[args.late]
    failures = []
    print(f"growth step {args.early} -> {args.late} (bounds: RSS <= {args.rss_ratio}x + {args.rss_slack_mib} MiB, "
          f"fds +{args.fd_growth}, shm +{args.shm_growth}):")
    for name in sorted(set(early) & set(late)):
        a, b = early[name], late[name]
        ratio = b["rss_mib"] / max(a["rss_mib"], 1e-9)
        d_rss, d_fd, d_shm = b["rss_mib"] - a["rss_mib"], b["fds"] - a["fds"], b["shm"] - a["shm"]
        over = []
        if b["rss_mib"] > a["rss_mib"] * args.rss_ratio + args.rss_slack_mib:
            over.append("RSS")
        if d_fd > args.fd_growth:
            over.append("fds")
        if d_shm > args.shm_growth:
            over.append("shm")
        print(f"  {name:<28} RSS x{ratio:.3f} ({d_rss:+.1f} MiB)  fds {d_fd:+d}  shm {d_shm:+d}"
              f"{'  OVER: ' + ', '.join(over) if over else ''}")
        failures += [f"{name}: {o}" for o in over]
    gone = sorted(set(early) - set(late))
    if gone:
        print(f"  processes gone by step {args.late}: {', '.join(gone)}")
    if rc != 0:
        failures.append(f"the job exited with code {rc}")
    print("soak: FAIL (" + "; ".join(failures) + ")" if failures else "soak: OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
