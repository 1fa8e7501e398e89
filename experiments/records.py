"""Where an experiment's record goes: appended to a record file only when asked (--record FILE, e.g.
experiments/evolve_results.json), otherwise into the experiment's own work folder under runs/ (git-ignored)."""

from __future__ import annotations

import json
from pathlib import Path

import common

RUNS = Path(__file__).resolve().parents[1] / "runs" / "experiments"  # default work folders


def save(record: dict, record_file: str, default: Path) -> Path:
    """Append `record` to the JSON list in `record_file`, or (no record_file) write it alone to `default`."""
    if not record_file:
        common.write_json_atomic(default, record)
        print(f"record written to {default} (--record FILE appends it to a record file)")
        return default
    path = Path(record_file)
    history = json.loads(path.read_text()) if path.exists() else []
    common.write_json_atomic(path, history + [record])
    print(f"appended to {path} ({len(history) + 1} records)")
    return path
