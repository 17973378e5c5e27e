"""launcher/commands: one module per sub-command of `python -m launcher` beyond running a job.

commands.py maps each sub-command to its function; sft.py, evaluate.py (eval), difficulty.py (filter),
data.py (data) and demo.py (the main job) hold theirs; inputs.py loads what sft, eval and filter share (--model,
--data and their flags, derived from the config's fields). May import the rest of the launcher,
`actors` and `policies`; nothing imports it but `launcher.__main__`.
"""
