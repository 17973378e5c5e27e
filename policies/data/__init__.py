"""policies/data: problems and SFT pairs from files, and the prompt the model sees.

records.py (Problem, SFTPair, SFTChat, Layout, LoadStats, DatasetError), rows.py (one row into a record; the
malformed-row loop), answers.py (reference answers in GSM8K / MATH shapes), table_data.py (parquet, JSON,
arrow, saved datasets), dataset.py (load_problems, load_sft_pairs, write_jsonl), prompts.py (chat prompt,
directive, stop tokens), order.py (the sampler's batch order). Imports policies.verify (\\boxed{}
extraction), orjson, numpy and `datasets`; nothing from model/, train/ or any actor.
"""
