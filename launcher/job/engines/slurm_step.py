"""Run inside every Slurm step the launcher starts (as a file: it imports nothing of ours), then exec the actor.

    python slurm_step.py NAME KEY=VALUE... -- python -m launcher actor ...

It prints where the step runs ("[slurm] NAME: Slurm step JOB.STEP on NODE"), the line the launcher quotes
when the actor fails, and sets the planned environment. GPUs come from Slurm: the planner's
CUDA_VISIBLE_DEVICES are indices among the GPUs this step got (the node's GPUs of the job), mapped here
through the CUDA_VISIBLE_DEVICES Slurm set (when it gave the step GPUs), so a node shared with other jobs is never guessed at.
"""
import os
import socket
import sys


def slurm_devices(planned: str, given: str | None) -> str:
    """The planner's device indices, as the ids Slurm gave this step (unchanged when it gave none)."""
    ids = [d for d in (given or "").split(",") if d.strip()]
    if not ids:
        return planned
    return ",".join(ids[int(i) % len(ids)] for i in planned.split(",") if i.strip().isdigit())


def main(argv: list[str]) -> None:
    name, rest = argv[0], argv[1:]
    split = rest.index("--")
    env = dict(kv.split("=", 1) for kv in rest[:split])
    command = rest[split + 1:]
    gpus = ""
    if "CUDA_VISIBLE_DEVICES" in env and (os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS")):
        env["CUDA_VISIBLE_DEVICES"] = slurm_devices(env["CUDA_VISIBLE_DEVICES"], os.environ.get("CUDA_VISIBLE_DEVICES"))
        gpus = f", GPUs {env['CUDA_VISIBLE_DEVICES']}"
    step = f"{os.environ.get('SLURM_JOB_ID', '?')}.{os.environ.get('SLURM_STEP_ID', '?')}"
    print(f"[slurm] {name}: Slurm step {step} on {socket.gethostname()}{gpus}", flush=True)
    os.environ.update(env)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
