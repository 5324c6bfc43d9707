"""Child processes that run this same thrifty (bench cells, the feature server, workers)."""

from __future__ import annotations

import os
from pathlib import Path


SOURCE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds the `thrifty` package


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with thrifty's source root first on PYTHONPATH, so a `python -m thrifty...`
    child imports the same code (a checkout runs without being installed)."""
    env = {**os.environ, **(extra or {})}
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([SOURCE_ROOT, *rest])
    return env
