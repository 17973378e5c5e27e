"""policies/infer."""
