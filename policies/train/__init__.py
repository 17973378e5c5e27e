"""policies/train: one optimisation step of PPO or SFT on a packed batch.

ppo.py (PPOConfig/SFTConfig and the train steps), losses.py (PPO, GSPO, CISPO, SFT), aggregation.py
(ppo.loss_agg), advantages.py (ppo.advantage), mismatch.py (ppo.mismatch), recipes.py (ppo.recipe presets),
optim.py (optimiser and the clipped, finite-checked step), schedule.py (learning-rate schedules), data_parallel.py (ranks sharing a
step). Imports torch, policies.model and tensors.allocator (micro-batches); never actors, bus or launcher.
"""
