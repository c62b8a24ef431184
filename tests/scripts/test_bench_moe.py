"""scripts/bench_moe.py runs end to end on tiny shapes and reports what its README table quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_moe.py"
TINY = ["--tokens", "256", "--d-model", "32", "--d-hidden", "64", "--repeats", "1", "--no-pypi"]


def run_bench(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_targets_grid_reports_every_ratio_target() -> None:
    result = run_bench()
    assert set(result["targets"]) == {
        "fwd+bwd_8_experts_vs_dense",
        "fwd+bwd_32_experts_vs_dense",
        "fwd_128_experts_vs_dense",
        "time_per_token_128_vs_8_experts_at_256_per_expert",
    }
    for target in result["targets"].values():
        assert target["measured"] > 0 and target["met"] in (True, False)


def test_workers_grid_times_the_serial_expert_loop_beside_the_workers() -> None:
    result = run_bench("--grid", "workers")
    rows = result["results"]
    assert [(r["mode"], r["num_experts"]) for r in rows] == [
        *(("fwd+bwd", e) for e in (8, 16, 32, 64, 128)),
        ("fwd", 128),
    ]
    assert all(r["workers_vs_serial"] > 0 and r["moe_serial_tokens_per_s"] > 0 for r in rows)
