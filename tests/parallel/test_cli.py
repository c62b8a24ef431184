"""`nmt-moe train` with devices=2 and expert_parallel_size=2 on CPU, launched by the Trainer itself (in a
subprocess: strategy=ddp would re-launch pytest); its checkpoint resumes on the same layout, translates in
one process, and re-shards to 2 ranks with the outputs of one process. Checkpoints are sharded directories
(torch.distributed.checkpoint); `nmt-moe translate` reads them directly.

Run with `python -m pytest -q -m distributed tests/parallel/test_cli.py` (deselected by default).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.distributed import free_port
from helpers.training import RECIPE, write_copy_task

from nmt_moe.checkpoint import load_model, read_model_files
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import collectives, parallel
from nmt_moe.sharded_checkpoint import full_checkpoint, is_sharded_checkpoint

pytestmark = pytest.mark.distributed


def nmt_moe(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "nmt_moe.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_2_ranks(data: Path, root: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess:
    return nmt_moe(
        "train", "fit", "--config", str(RECIPE),
        "--data.pipeline.train", str(data / "train"), "--data.pipeline.valid", str(data / "valid"),
        "--data.pipeline.test", str(data / "test"), "--data.cache_dir", str(data / "cache"),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--wandb", "off",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--model.expert_parallel_size", "2", "--trainer.max_epochs", str(epochs),
        "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "2", *extra,
        cwd=root,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two epochs of 6 steps on 2 processes: an epoch validated by greedy BLEU (decoding in lockstep), then a
    resume from last.ckpt validated by loss only; returns (data, root). Experts stay sharded throughout."""
    data = write_copy_task(tmp_path_factory.mktemp("data"))
    root = tmp_path_factory.mktemp("run")
    first = train_2_ranks(data, root, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    by_loss = ["--model.val_max_sentences", "0"]  # the checkpoint then follows val/loss by itself
    resumed = train_2_ranks(data, root, 2, "--ckpt_path", "last", *by_loss)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr
    assert list((root / "checkpoints").glob("best-step12-loss*.ckpt"))  # the best by loss after the resume
    for version, key in ((0, "val/bleu"), (1, "val/loss")):
        with open(root / "csv" / f"version_{version}" / "metrics.csv") as f:
            assert any(row.get(key) for row in csv.DictReader(f)), (version, key)
    return data, root


def test_two_rank_checkpoint_holds_full_experts_and_translates_in_one_process(run: tuple[Path, Path]) -> None:
    data, root = run
    checkpoint = root / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(checkpoint)  # a directory: each rank wrote its own experts
    state = full_checkpoint(checkpoint)  # consolidated in this process
    assert state["global_step"] == 12  # two epochs of 6 steps: the resume continued
    config = state["nmt_moe"]["model_config"]
    w_in = state["state_dict"]["model.encoder.moe.0.experts.w_in"]
    assert w_in.shape[0] == config["moe"]["num_experts"] == 4  # both ranks' shards, consolidated
    moments = [
        s["exp_avg"] for s in state["optimizer_states"][0]["state"].values() if s["exp_avg"].dim() == 3
    ]
    assert moments and all(m.shape[0] == 4 for m in moments)  # per-expert Adam moments, consolidated too

    result = nmt_moe("translate", "-m", str(checkpoint), "--beam", "2", "--quiet",
                     "-i", str(data / "test.src"), cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == len((data / "test.src").read_text().splitlines())


def _resharded_worker(rank: int, world: int, port: int, checkpoint: Path, out_dir: Path) -> None:
    """Rebuild the model from the checkpoint's config, shard, load the sliced full tensors (what resuming
    with expert_parallel_size=2 does), and run this rank's half of a batch through the all-to-all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config, state, _ = read_model_files(checkpoint)
        model = Seq2Seq(Seq2SeqConfig.from_dict(config)).eval()
        parallel.shard_experts(model, collectives.init_expert_parallel(world))
        parallel.shard_expert_state(state, model)
        model.load_state_dict(state)  # strict: shapes must be the shard's
        src, lengths, tgt = batch()
        half = slice(rank * 2, rank * 2 + 2)
        with torch.no_grad():
            logits = model(src[half], lengths[half], tgt[half]).logits
        torch.save(logits, out_dir / f"logits{rank}.pt")
    finally:
        dist.destroy_process_group()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    src = torch.randint(4, 56, (4, 6))
    tgt = torch.randint(4, 56, (4, 5))
    return src, torch.tensor([6, 6, 4, 5]), tgt


def test_two_rank_checkpoint_reshards_with_the_outputs_of_one_process(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint = run[1] / "checkpoints" / "last.ckpt"
    mp.spawn(_resharded_worker, args=(2, free_port(), checkpoint, tmp_path), nprocs=2, join=True)
    sharded = torch.cat([torch.load(tmp_path / f"logits{r}.pt") for r in range(2)])
    model, _ = load_model(checkpoint)
    src, lengths, tgt = batch()
    with torch.no_grad():
        expected = model(src, lengths, tgt).logits
    torch.testing.assert_close(sharded, expected, atol=1e-5, rtol=1e-5)


def last_val(metrics: Path) -> dict[str, float]:
    with open(metrics) as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def test_validation_with_sharded_experts_matches_one_process(run: tuple[Path, Path]) -> None:
    """Loss and greedy BLEU of the 2-rank sharded checkpoint: validated on 2 ranks with the experts sharded
    (decoding in lockstep, nothing gathered) and in one process (the checkpoint consolidated)."""
    data, root = run
    checkpoint = root / "checkpoints" / "last.ckpt"
    common = ["--config", str(RECIPE), "--data.pipeline.train", str(data / "train"),
              "--data.pipeline.valid", str(data / "valid"), "--data.pipeline.test", str(data / "test"),
              "--data.cache_dir", str(data / "cache"), "--wandb", "off",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.accelerator", "cpu", "--ckpt_path", str(checkpoint)]  # fmt: skip
    layouts = {
        "one": ["--trainer.devices", "1"],
        "two": ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.expert_parallel_size", "2"],
    }
    for name, layout in layouts.items():
        result = nmt_moe("train", "validate", *common, *layout, "--trainer.default_root_dir", name, cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    one = last_val(root / "one" / "csv" / "version_0" / "metrics.csv")
    two = last_val(root / "two" / "csv" / "version_0" / "metrics.csv")
    assert one["val/chrf"] > 0  # hypotheses were decoded and scored (BLEU is 0 this early in training)
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-4)
    assert two["val/bleu"] == pytest.approx(one["val/bleu"], abs=1e-6)
    assert two["val/chrf"] == pytest.approx(one["val/chrf"], abs=1e-6)
