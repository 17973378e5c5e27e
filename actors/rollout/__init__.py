"""actors/rollout: multi-turn rollouts (issue #30).

- sandbox.py: `run_python`, the Python tool for agents, run in a jail (own uid, network/mount/PID namespaces
  where root allows, rlimits, timeout); sandbox_jail.py is its child side (standard library only).

May import actors.base/protocol, policies, tensors, bus.
"""
