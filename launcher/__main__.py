import sys
print("launcher: not yet implemented", file=sys.stderr)
