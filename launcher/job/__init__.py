"""launcher/job."""
