"""sample_votes: not implemented yet (see its issue)."""
import sys

sys.exit("sample_votes.py: not implemented yet")
