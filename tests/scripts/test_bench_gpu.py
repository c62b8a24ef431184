"""scripts/bench_gpu.py at toy sizes on CPU: every case runs and the JSON holds what docs/SPEED.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gpu.py"


def test_tiny_cpu_run_reports_every_case(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--repeats", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    cases = {(c["d_hidden"], c["experts"], c["regime"]): c for c in result["layer"]}
    assert set(cases) == {(32, e, r) for e in (4, 8) for r in ("tokens", "per_expert")}
    for case in cases.values():
        assert case["moe_over_dense"] == pytest.approx(case["dense_s"] / case["moe_s"])
        assert case["moe_tokens_per_s"] == pytest.approx(case["tokens"] / case["moe_s"])
        assert case["grouped_gemm"] is False  # "auto" on CPU: the loop
    assert cases[(32, 8, "per_expert")]["tokens"] == 2 * cases[(32, 4, "per_expert")]["tokens"]
    for name in ("flat32", "hierarchical"):
        step = result["train_step"][name]
        assert step["moe_s"] > 0 and step["dense_s"] > 0
    assert result["train_step"]["hierarchical"]["model"]["gate"] == "hierarchical"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "CUDA" in run.stderr
