"""evaluate: not implemented yet (see its issue)."""
import sys

sys.exit("evaluate.py: not implemented yet")
