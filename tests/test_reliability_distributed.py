"""Reliability on several ranks (CPU, gloo, 2 processes; `-m distributed`).

- Loss-free balancing under plain data parallelism: every rank ends with the bias one process computes
  from the union of the ranks' batches (each rank used to update from its own counts, and DDP's buffer
  broadcast then gave every rank rank 0's bias).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_parallel_distributed import spawn

from nmt_moe.moe import MoELayer
from nmt_moe.training.module import update_balancing_biases

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORLD, TOKENS, D_MODEL = 2, 40, 8


# --- loss-free bias ----------------------------------------------------------------------------------------


def balanced_layers() -> list[MoELayer]:
    """Two MoE layers with loss-free biases, one with a skewed router so the two ranks' loads differ."""
    torch.manual_seed(0)
    options = {"loss_free_bias": True, "bias_update_rate": 0.1}
    layers = [
        MoELayer(D_MODEL, 16, num_experts=4, k=2, gate="softmax_topk", **options),
        MoELayer(D_MODEL, 16, num_experts=6, k=1, gate="switch", **options),
    ]
    return [layer.train() for layer in layers]


def batches() -> torch.Tensor:
    """[W, N, d]: rank r's batch is batches()[r]; rank 1's tokens are shifted to load other experts."""
    torch.manual_seed(1)
    x = torch.randn(WORLD, TOKENS, D_MODEL)
    x[1] += 2.0
    return x


def _bias_worker(rank: int, world: int, out_dir: Path) -> None:
    layers = balanced_layers()
    for step in range(3):
        for layer in layers:
            layer(batches()[rank] * (step + 1))
        update_balancing_biases(layers, across_ranks=True)
    torch.save([layer.expert_bias for layer in layers], out_dir / f"bias{rank}.pt")


def one_process_biases(across: str) -> list[torch.Tensor]:
    """The biases after 3 steps in one process: on the union of the batches, or on rank 0's alone."""
    layers = balanced_layers()
    for step in range(3):
        for layer in layers:
            for rank in range(WORLD) if across == "union" else [0]:
                layer(batches()[rank] * (step + 1))
        update_balancing_biases(layers, across_ranks=False)
    return [layer.expert_bias for layer in layers]


def test_loss_free_bias_moves_with_the_load_of_all_ranks(tmp_path: Path) -> None:
    spawn(_bias_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"bias{r}.pt") for r in range(WORLD)]
    union, rank0_only = one_process_biases("union"), one_process_biases("rank0")
    for layer, expected in enumerate(union):
        assert bool(expected.ne(0).any())
        for rank in range(WORLD):
            assert torch.equal(ranks[rank][layer], expected), (rank, layer)
    # the old behaviour (rank 0's own counts, broadcast) gives another bias: the check above can fail
    assert any(not torch.equal(a, b) for a, b in zip(union, rank0_only, strict=True))
