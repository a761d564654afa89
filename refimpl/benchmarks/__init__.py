"""Benchmarks behind ``python -m refimpl bench NAME``: one module per benchmark, each with ``main(argv)``.

Timings are measured in one run on this machine and reported as JSON plus a printed table; ratios against a
baseline measured in the same run are what a reader should compare (the machine is shared and noisy).
"""
from __future__ import annotations

import json
import os

__all__ = ["write_json"]


def _plain(o):
    """NumPy scalars and arrays as Python numbers and lists; anything else as its string."""
    return o.tolist() if hasattr(o, "tolist") else str(o)


def write_json(path: str, obj) -> None:
    """Write a benchmark's results to ``path`` (its directory created if needed) as indented JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=_plain)
