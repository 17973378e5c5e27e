"""launcher/commands."""
