"""policies/model: a causal LM loaded and run over packed 1D batches.

loading.py (checkpoints and tokenizers, GGUF conversion), packed_attention.py (attention over packed
sequences), logprobs.py (per-token logprobs of a packed batch), shared_prompts.py (one prefill for the G
responses of a prompt), precision.py (bf16 choice). Imports torch and transformers only; the other
policies sub-packages build on this one, never the reverse.
"""
