"""actors/rollout: rollout workers, which run `rollout.workflow` (agents, multi-turn, tools) for the sampler.

A workflow is ``async def workflow(problem: dict, client: openai.AsyncOpenAI) -> float | None`` (workflow.py;
the single-turn recipe as one: builtin.py). For each of a prompt's G samples the worker (actor.py) opens a
session on a generator, runs the workflow in a worker process under limits (pool.py, worker.py) with a client
bound to that session, closes it and keeps what the session recorded; the group's trajectories become one
PackedBatch (trajectory.py) that travels the generator's route: tensors to the packer, SCORE to a verifier.
Tools for workflows: sandbox.py's `run_python` runs a Python snippet in a jail (own uid, network/mount/PID
namespaces where root allows, rlimits, timeout); sandbox_jail.py is its child side (standard library only).
May import actors.base/protocol, policies, tensors and bus; nothing of the other actors.
"""
