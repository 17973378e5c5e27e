"""Named recipes (`ppo.recipe`): the loss, clip, aggregation, advantage, mismatch correction, dynamic
sampling and overlong punishment a user arriving from TRL / verl / AReaL expects under that name.

A recipe sets only the keys the user left unset (null); a key the user sets wins. `boba` (the default)
is today's behaviour: decoupled PPO, symmetric clip `ppo.eps_clip`, token-mean loss, batch-normalised
returns, boba's behaviour-weight cap, no dynamic sampling, no overlong punishment. Sources:
- grpo: DeepSeekMath (arXiv 2402.03300) as TRL's loss_type="grpo": sequence mean of token means,
  group-normalised advantages;
- dr_grpo: Dr.GRPO (arXiv 2503.20783): no std, no length normalisation (a constant: the generation budget);
- dapo: DAPO (arXiv 2503.14476): clip-higher (0.2 / 0.28), token-mean loss, dynamic sampling, soft
  overlong punishment (the last fifth of the budget: 4096 of 20480 in the paper); plus token-level
  TIS (C = 2) against the generator's logprobs, which the paper predates and verl's DAPO runs add;
- gspo: GSPO (arXiv 2507.18071): sequence ratio, clip 3e-4 / 4e-4, sequence mean of token means;
- cispo: CISPO (MiniMax-M1, arXiv 2506.13585): clipped stop-gradient IS weight, no lower bound,
  eps_high 0.28 (verl / Trinity-RFT's default; MiniMax tuned only the upper bound), token-mean loss.
"""
from __future__ import annotations

RECIPES = ("boba", "grpo", "dr_grpo", "dapo", "gspo", "cispo")

# ppo.* keys of each recipe (eps_clip_low/high absent: ppo.eps_clip)
_PPO: dict[str, dict] = {
    "boba": dict(loss="ppo", loss_agg="token_mean", advantage="boba", mismatch="none"),
    "grpo": dict(loss="ppo", loss_agg="seq_mean_token_mean", advantage="grpo", mismatch="none"),
    "dr_grpo": dict(loss="ppo", loss_agg="seq_mean_token_sum_norm", advantage="dr_grpo", mismatch="none"),
    "dapo": dict(loss="ppo", eps_clip_low=0.2, eps_clip_high=0.28, loss_agg="token_mean", advantage="grpo",
                 mismatch="tis", mismatch_level="token", mismatch_threshold=2.0),
    "gspo": dict(loss="gspo", eps_clip_low=3e-4, eps_clip_high=4e-4, loss_agg="seq_mean_token_mean",
                 advantage="grpo", mismatch="none"),
    "cispo": dict(loss="cispo", eps_clip_low=1.0, eps_clip_high=0.28, loss_agg="token_mean", advantage="grpo",
                  mismatch="none"),
}
# the PPO keys a recipe fills, and their value where no recipe names one
PPO_KEYS = ("loss", "eps_clip_low", "eps_clip_high", "loss_agg", "advantage", "mismatch", "mismatch_level",
            "mismatch_threshold")
_FALLBACK = dict(mismatch_level="token", mismatch_threshold=2.0)

OVERLONG_BUFFER_FRACTION = 0.2  # DAPO: 4096 of 20480 tokens


def ppo_values(recipe: str, eps_clip: float) -> dict:
    """The ppo.* values `recipe` gives the keys of PPO_KEYS."""
    if recipe not in _PPO:
        raise ValueError(f"recipe={recipe!r}: must be one of {', '.join(RECIPES)}")
    return {**_FALLBACK, "eps_clip_low": eps_clip, "eps_clip_high": eps_clip, **_PPO[recipe]}


def dynamic_sampling(recipe: str) -> bool:
    """rollout.dynamic_sampling under `recipe`."""
    return recipe == "dapo"


def overlong_buffer(recipe: str, max_new_tokens: int) -> int:
    """reward.overlong.buffer (tokens) under `recipe`: 0 = off."""
    return max(1, round(OVERLONG_BUFFER_FRACTION * max_new_tokens)) if recipe == "dapo" else 0
