"""launcher: `python -m launcher`, the user's entry point (see __main__.py for the sub-commands).

config/ (YAML -> validated settings), job/ (one training job: builders, placement, spawning, metrics),
commands/ (the other sub-commands: main, sft, eval, filter, data, attach, status, keys), mathdata.py and
plot.py (`python -m launcher.mathdata`, `python -m launcher.plot`), gymdata.py (reasoning-gym's problems:
`python -m launcher data`). The top of the tree: it may import
actors, policies, tensors and bus; nothing imports it.
"""
