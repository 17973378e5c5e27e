"""policies/train."""
