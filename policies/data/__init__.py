"""policies/data."""
