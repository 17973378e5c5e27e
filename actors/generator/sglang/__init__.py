"""actors/generator/sglang: an SGLang server (0.5.23) as a generator backend.

- protocol.py: its HTTP protocol as pure data (request bodies, reply parsers, errors, weight buckets);
- client.py: the async HTTP client (every call with a deadline, errors naming URL and phase);
- server.py: launching and supervising a server process;
- backend.py: the generator's Backend over a client (and its server), `make_sglang_backend`;
- adapters.py: a LoRA job's adapters into a server run with --enable-lora (files, /load_lora_adapter, retire).

Weights reach the server by actors.weights (sglang_distributed, sglang_disk), a LoRA job's by adapters.py.
May import actors.weights.sglang_disk, policies (policies.model.lora for adapters) and tensors; nothing of
the launcher (the builder passes settings).
"""
