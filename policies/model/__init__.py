"""policies/model."""
