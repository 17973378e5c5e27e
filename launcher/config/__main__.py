"""``python -m launcher.config [config.yaml] [key=value ...]``: print the effective config."""
import sys

from launcher.config.printer import main

sys.exit(main())
