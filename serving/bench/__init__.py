"""Serving benchmarks: scripts that measure the compared things side by side in one run and write a results JSON
that ``robustserve bench render`` turns into a BENCHMARKS.md section."""
from __future__ import annotations

import json
from pathlib import Path


def write(result: dict, out: str | Path) -> Path:
    """Writes a results JSON (indented, newline-terminated) to ``out``, creating its folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
