"""policies/infer: token generation on torch (the CPU generator backend's engine).

llama_infer.py (a compact decoder with a KV cache), hf_decoder.py (any HF model as a fallback),
token_draw.py (temperature, top-k/top-p and the inverse-CDF draw), sampling.py (the engine: G samples per
prompt sharing one prefill, continuous batching, stop tokens, weight updates), evaluate.py (pass@1 over k
samples, scored by policies.verify). Imports torch, policies.model, policies.data and policies.verify;
never train/ or anything above policies.
"""
