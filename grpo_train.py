"""grpo_train: not implemented yet (see its issue)."""
import sys

sys.exit("grpo_train.py: not implemented yet")
