"""The asyncio actors: thin shells that move messages and tensors, each a plain class that runs in any loop.

Read ``rl_step`` first (one synchronous step, top to bottom, calling what the actors call), then
``protocol`` (every message, its fields and who sends it; the weight version is the step count).
Here: ``base`` (Actor, @handler, run), ``protocol``, ``rl_step``, ``children`` (child processes that die with
their parent: the launcher's and the SGLang servers'), the ``packer`` and ``verifier`` actors,
and one sub-package per remaining job: ``sampler/`` (admission and dealing of prompts), ``generator/``
(the generator actor and its backends: torch, sim, sglang/), ``learner/`` (training, ranks, checkpoints,
the trained record), ``weights/`` (getting the learner's weights to every generator).

May import ``policies``, ``tensors`` and ``bus``; never ``launcher`` (an actor gets its settings, not the
launcher's config tree). The math stays in ``policies``; an actor orders, moves, times and reports.
"""
