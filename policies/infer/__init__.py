"""policies/infer: token generation on torch (the CPU generator backend's engine).

llama_infer.py (a compact decoder with a KV cache), hf_decoder.py (any HF model as a fallback),
sampling.py (G samples per prompt sharing one prefill, top-p/temperature, stop tokens). Imports torch and
policies.model; never train/ or anything above policies.
"""
