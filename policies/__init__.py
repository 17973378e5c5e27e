"""policies: the math, with no actors and no bus.

model/ (loading, packed forward and logprobs), infer/ (decoding with a KV cache), train/ (PPO and SFT
losses, advantages, optimiser steps), verify/ (answer checking, rewards), data/ (problem files, the chat
prompt); cost_model.py is the simulated compute of the scale twin. Pure functions of tensors and text:
imports torch, transformers, the standard library and tensors' plain types (the micro-batch allocator),
never bus, actors or launcher.
"""
