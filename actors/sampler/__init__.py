"""actors/sampler."""
