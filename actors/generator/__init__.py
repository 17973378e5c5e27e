"""actors/generator."""
