"""policies/verify: is a response's answer right, and what reward it earns.

boxed.py (the last \\boxed{}), answer_normalize.py / math_equal.py (answer equality), answer_guard.py
(refusals and hedges), verifier.py + verifier_pool.py (checking in worker processes with deadlines),
reward.py / reward_fns.py (the reward and user reward functions), gym_score.py (reasoning-gym's scorers as
one). Imports math_verify, reasoning_gym (gym_score.py only) and the standard library; nothing from the other
policies sub-packages.
"""
