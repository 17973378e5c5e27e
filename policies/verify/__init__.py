"""policies/verify."""
