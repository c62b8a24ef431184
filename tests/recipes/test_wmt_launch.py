"""Multi-node launching of the WMT'14 recipe, proven on one box: two torchrun agents act as two nodes
(c10d rendezvous on 127.0.0.1, gloo, one rank each) and train config.yaml + reduced.yaml with the experts
sharded across the two "nodes" (expert_parallel_size 2), then resume from `--ckpt_path last`. Written
against the CLI's behaviour (a last checkpoint exists, the step count continues, the loss is finite), not
against the checkpoint format.

    python -m pytest -q -m distributed tests/recipes/test_wmt_launch.py     (about 1-2 minutes)

The SLURM scripts are checked in tests/recipes/test_wmt.py (they cannot run without a cluster).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import write_wmt_layout
from helpers.distributed import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wmt14_en_de"
# What a few hundred lines of toy data support (run.sh --smoke uses the same); the model is reduced.yaml's.
DATA_FLAGS = ["pipeline.vocab_size", "200", "pipeline.spm_model_type", "bpe", "max_tokens", "1024",
              "num_workers", "0", "num_proc", "1"]  # fmt: skip


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def data_args(data: Path, cache: Path, prefix: str) -> list[str]:
    pairs = [("pipeline.train", data / "train"), ("pipeline.valid", data / "newstest2013"),
             ("pipeline.test", data / "newstest2014"), ("cache_dir", cache)]  # fmt: skip
    flags = [*pairs, *zip(DATA_FLAGS[::2], DATA_FLAGS[1::2], strict=True)]
    return [arg for name, value in flags for arg in (f"--{prefix}{name}", str(value))]


def two_nodes(data: Path, cache: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    """Run both torchrun agents (one per "node") to the end; returns their combined outputs."""
    port = free_port()
    train = [
        "-m", "nmt_moe.cli", "train", "fit", "--config", str(RECIPE / "config.yaml"),
        "--config", str(RECIPE / "reduced.yaml"), *data_args(data, cache, "data."),
        "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
        "--model.expert_parallel_size", "2", "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1", "--expert_load.every_n_steps", "1",
        "--trainer.default_root_dir", str(root), "--wandb", "off", *extra,
    ]  # fmt: skip
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"wmt14-{port}",
        "--max-restarts", "0",
    ]  # fmt: skip
    agents = [
        subprocess.Popen(
            [*agent, *train],
            cwd=root,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = []
    try:
        for process in agents:
            outputs.append(process.communicate(timeout=600)[0])
    finally:
        for process in agents:
            if process.poll() is None:
                process.kill()
    for process, output in zip(agents, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    return outputs


def logged(root: Path, version: int) -> list[dict[str, str]]:
    with (root / "csv" / f"version_{version}" / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def losses(rows: list[dict[str, str]]) -> dict[int, float]:
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


def test_two_torchrun_nodes_train_the_recipe_with_sharded_experts_and_resume(tmp_path: Path) -> None:
    data, cache, root = tmp_path / "data", tmp_path / "cache", tmp_path / "run"
    write_wmt_layout(data, "en", "de")
    root.mkdir()
    prepare = subprocess.run(
        [sys.executable, "-m", "nmt_moe.cli", "prepare", "--config", str(RECIPE / "config.yaml"),
         *data_args(data, cache, "")],  # fmt: skip
        env=environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert prepare.returncode == 0, prepare.stderr[-3000:]

    outputs = two_nodes(data, cache, root, max_steps=4)
    assert any("Starting with 2 processes" in output for output in outputs), outputs[0][-3000:]
    first = losses(logged(root, 0))
    assert sorted(first) == [0, 1, 2, 3], first
    assert all(math.isfinite(loss) for loss in first.values())
    checkpoints = root / "checkpoints"
    assert any(path.name.startswith("last") for path in checkpoints.iterdir()), list(checkpoints.iterdir())
    assert any(row.get("moe/encoder.moe0/max_load_share") for row in logged(root, 0))  # global load logged

    two_nodes(data, cache, root, 8, "--ckpt_path", "last")
    resumed = losses(logged(root, 1))
    assert sorted(resumed) == [4, 5, 6, 7], resumed  # the step count continues from the checkpoint
    assert all(math.isfinite(loss) for loss in resumed.values())
