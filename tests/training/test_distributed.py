"""`nmt-moe train` under DDP on CPU (2 gloo processes, in a subprocess): training completes, and validating
a checkpoint on 2 ranks gives the loss and BLEU of 1 rank (metrics and hypotheses gathered, not per rank)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.training import RECIPE, write_copy_task


def nmt_moe_train(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nmt_moe.cli", "train", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def last_val(metrics: Path) -> dict[str, float]:
    with open(metrics) as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


@pytest.mark.distributed
def test_ddp_training_and_validation_match_one_process(tmp_path: Path) -> None:
    data = write_copy_task(tmp_path / "data")
    common = [
        "--config", str(RECIPE), "--data.pipeline.train", str(data / "train"),
        "--data.pipeline.valid", str(data / "valid"), "--data.pipeline.test", str(data / "test"),
        "--data.cache_dir", str(data / "cache"), "--wandb", "off",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    nmt_moe_train(
        "fit", *common, *ddp, "--trainer.max_epochs", "3", "--trainer.default_root_dir", "fit", cwd=tmp_path
    )
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    assert (tmp_path / "fit" / "csv" / "version_0" / "expert_load" / "encoder.moe0.png").exists()

    for name, extra in (("one", ["--trainer.devices", "1"]), ("two", ddp)):
        args = [*common, *extra, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", name]
        nmt_moe_train("validate", *args, cwd=tmp_path)
    one = last_val(tmp_path / "one" / "csv" / "version_0" / "metrics.csv")
    two = last_val(tmp_path / "two" / "csv" / "version_0" / "metrics.csv")
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-4)
    assert two["val/bleu"] == pytest.approx(one["val/bleu"], abs=1e-6)
    assert two["val/chrf"] == pytest.approx(one["val/chrf"], abs=1e-6)
