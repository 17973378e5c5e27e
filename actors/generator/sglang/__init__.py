"""actors/generator/sglang."""
