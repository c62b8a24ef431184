"""Where the tests find the project and the real data."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"  # beside the project root; tests skip without it
