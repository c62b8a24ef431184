"""Sharded expert-parallel checkpoints (torch.distributed.checkpoint) with real Trainers on CPU/gloo: each
rank writes only its own experts and nothing gathers them while saving; a checkpoint reshards 4 ranks -> 2 ->
1 process -> 2 ranks with bitwise-identical weights and optimizer state.

Each rank is a process started by torch.multiprocessing with the torchrun environment variables, so
Lightning joins the existing processes instead of launching (strategy="ddp" would re-launch pytest).
Run with `python -m pytest -q -m distributed tests/parallel/test_checkpoint.py` (deselected by default).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.distributed import free_port
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nmt_moe.moe import MoELayer, collectives
from nmt_moe.sharded_checkpoint import DCP_METADATA, SafeReader, full_checkpoint, read_meta
from nmt_moe.training.expert_parallel import ExpertParallelStrategy
from nmt_moe.training.faults import SafeCheckpointIO

pytestmark = pytest.mark.distributed

D_MODEL, D_HIDDEN, EXPERTS, STEPS = 16, 256, 8, 3
EXPERT_KEYS = ("state_dict/moe.experts.w_in", "state_dict/moe.experts.w_out")


class TinyMoE(pl.LightningModule):
    """One MoE layer between two linear maps, regressing a fixed random map: enough to give every expert
    weights and Adam moments that differ by expert."""

    def __init__(self, expert_parallel_size: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.expert_parallel_size = expert_parallel_size
        self.inp = nn.Linear(D_MODEL, D_MODEL)
        self.moe = MoELayer(D_MODEL, D_HIDDEN, EXPERTS, k=2, gate="softmax_topk", w_balance=0.01)
        self.out = nn.Linear(D_MODEL, D_MODEL)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.inp(x)
        moe = self.moe(h)
        return nn.functional.mse_loss(self.out(h + moe.y), y) + moe.aux_loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        rank = dist.get_rank() if dist.is_initialized() else 0
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(STEPS * 16, D_MODEL, generator=g)
        return DataLoader(TensorDataset(x, x.flip(1) * 2), batch_size=16)


def trainer(world: int, root: Path, size: int) -> pl.Trainer:
    strategy: Any = ExpertParallelStrategy() if world > 1 else "auto"
    return pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, plugins=[SafeCheckpointIO()], default_root_dir=root,
    )  # fmt: skip


def run_ranks(fn: Any, world: int, *args: Any) -> None:
    """fn(rank, world, *args) in `world` processes that Lightning sees as launched by torchrun."""
    mp.spawn(_rank, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _rank(rank: int, world: int, port: int, fn: Any, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), NODE_RANK="0", GROUP_RANK="0",
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    fn(rank, world, *args)


# --- workers -----------------------------------------------------------------------------------------------


def _train_and_save(rank: int, world: int, size: int, root: Path, out: Path) -> None:
    """Train STEPS steps with experts sharded over `size` ranks, then save with every tensor collective
    forbidden (nothing may gather experts) and object collectives recorded."""
    module = TinyMoE(size)
    t = trainer(world, root, size)
    t.fit(module)
    assert module.moe.experts.w_in.shape[0] == EXPERTS // size  # this rank's shard only
    payloads: list[Any] = []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_gather_into_tensor", "gather")}

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a tensor collective ran while saving")

    def recording(name: str) -> Any:
        original = getattr(dist, name)

        def record(*args: Any, **kwargs: Any) -> Any:
            for value in (*args, *kwargs.values()):  # the objects sent (and empty output lists)
                if isinstance(value, list | dict) or hasattr(value, "__dataclass_fields__"):
                    payloads.append(len(pickle.dumps(value)))
            return original(*args, **kwargs)

        return record

    object_collectives = (
        "all_gather_object",
        "gather_object",
        "broadcast_object_list",
        "scatter_object_list",
    )
    saved = {name: getattr(dist, name) for name in object_collectives}
    try:
        for name in originals:
            setattr(dist, name, forbidden)
        collectives.all_gather_cat = forbidden  # type: ignore[assignment]
        for name in object_collectives:
            setattr(dist, name, recording(name))
        t.save_checkpoint(out)
    finally:
        for name, fn in {**originals, **saved}.items():
            setattr(dist, name, fn)
    expert_bytes = EXPERTS * D_MODEL * D_HIDDEN * 4
    torch.save({"largest_payload": max(payloads, default=0), "expert_bytes": expert_bytes},
               root / f"payload{rank}.pt")  # fmt: skip


def _resume_and_save(rank: int, world: int, size: int, root: Path, source: Path, out: Path) -> None:
    """Load `source` into `size`-way sharded experts (no further step: max_steps is reached) and save."""
    module = TinyMoE(size)
    t = trainer(world, root, size)
    t.fit(module, ckpt_path=source)
    assert t.global_step == STEPS
    t.save_checkpoint(out)


# --- helpers -----------------------------------------------------------------------------------------------


def contents(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (sharded directory or file), full size, keyed by name: weights by
    `state_dict/<name>`, optimizer state by `optimizer/<parameter>/<key>`."""
    checkpoint = full_checkpoint(path) if path.is_dir() else torch.load(path, weights_only=True)
    names = [name for name, _ in TinyMoE().named_parameters()]
    flat = {f"state_dict/{key}": value for key, value in checkpoint["state_dict"].items()}
    for index, entry in checkpoint["optimizer_states"][0]["state"].items():
        flat.update({f"optimizer/{names[index]}/{key}": value for key, value in entry.items()})
    return flat


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key}"


# --- tests -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 ranks, expert_parallel_size 2 (two replicas of each shard), trained STEPS steps and saved."""
    root = tmp_path_factory.mktemp("ep4")
    run_ranks(_train_and_save, 4, 2, root, root / "ep.ckpt")
    return root / "ep.ckpt"


def test_each_rank_writes_only_its_experts_and_nothing_gathers_them(four_rank_checkpoint: Path) -> None:
    path = four_rank_checkpoint
    metadata = SafeReader(str(path)).read_metadata()
    files: dict[str, dict[str, list[int]]] = {}  # file -> expert key -> first experts of its chunks
    for index, info in metadata.storage_data.items():
        if index.fqn in EXPERT_KEYS or (index.fqn.startswith("optimizer_0/moe.experts.") and index.offset):
            files.setdefault(info.relative_path, {}).setdefault(index.fqn, []).append(index.offset[0])
    per_rank = EXPERTS // 2
    for name, chunks in files.items():  # "__<rank>_0.distcp": rank r holds experts of shard r % 2
        shard = int(name.split("_")[2]) % 2
        for key, starts in chunks.items():
            assert starts == [shard * per_rank], (name, key, starts)
    for key in EXPERT_KEYS:  # both shards of every expert weight are in the checkpoint, each in one file
        starts = sorted(start for chunks in files.values() for start in chunks.get(key, []))
        assert starts == [0, per_rank], (key, starts)
    sizes = {p.name: p.stat().st_size for p in path.glob("__*.distcp")}
    expert_bank = 2 * EXPERTS * D_MODEL * D_HIDDEN * 4  # w_in + w_out, fp32
    for name in sizes:
        # weights + 2 Adam moments of at most half the experts, plus the replicated rest (< 5 KiB)
        assert sizes[name] <= 3 * expert_bank // 2 + 8192, sizes
    assert sum(sizes.values()) >= 3 * expert_bank  # every expert and its moments written exactly once
    for rank in range(4):  # DCP's plans travel as objects: small, never an expert tensor
        payload = torch.load(path.parent / f"payload{rank}.pt", weights_only=True)
        assert 0 < payload["largest_payload"] < payload["expert_bytes"] // 4  # one shard is // 2
    assert not list(path.parent.glob(".*partial*"))  # the temp directory was renamed into place
    assert read_meta(path)["global_step"] == STEPS
    assert (path / DCP_METADATA).is_file()


def test_resharding_4_to_2_to_1_to_2_is_bitwise(four_rank_checkpoint: Path, tmp_path: Path) -> None:
    reference = contents(four_rank_checkpoint)
    assert any(key.endswith("exp_avg") and value.shape[0] == EXPERTS for key, value in reference.items())
    assert reference["optimizer/moe.experts.w_in/exp_avg"].abs().sum() > 0  # trained: moments non-zero

    two = tmp_path / "two.ckpt"  # 4 ranks -> 2 ranks (sharded -> sharded)
    run_ranks(_resume_and_save, 2, 2, tmp_path, four_rank_checkpoint, two)
    assert_bitwise_equal(reference, contents(two), "4 -> 2")

    one = tmp_path / "one.ckpt"  # 2 ranks -> 1 process (sharded -> one file, no expert parallelism)
    module, t = TinyMoE(1), trainer(1, tmp_path, 1)
    t.fit(module, ckpt_path=two)
    t.save_checkpoint(one)
    assert one.is_file()
    assert_bitwise_equal(reference, contents(one), "2 -> 1")

    again = tmp_path / "again.ckpt"  # 1 process -> 2 ranks (one file -> sharded)
    run_ranks(_resume_and_save, 2, 2, tmp_path, one, again)
    assert again.is_dir()
    assert_bitwise_equal(reference, contents(again), "1 -> 2")
