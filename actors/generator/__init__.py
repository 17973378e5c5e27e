"""actors/generator: the generator actor and its backends, which turn prompts into rollouts.

- generator.py: the `Generator` actor and the `Backend` it drives; `rollout_batch`, `rollout_stats`;
- torch_backend.py: policies.infer's GenerationEngine in this process (CPU or one GPU);
- sim.py: the simulated backend and generator (the cost model's time, random tokens) for scale runs;
- sglang/: an SGLang server as the backend;
- openai_api.py: every generator's OpenAI-compatible endpoint (aiohttp) for multi-turn rollouts;
  sessions.py: a session's turns -> the segments it trains on; chat_template.py: prompts without re-tokenising.

May import actors.base/protocol, actors.weights.sglang_disk (SGLang's disk way), policies, tensors, bus.
"""
