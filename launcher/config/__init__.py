"""launcher/config."""
