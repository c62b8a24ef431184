"""Expert parallelism with 2 CPU processes (gloo): the sharded layer and a sharded training step match one
process on the concatenated batch; skewed routing and empty ranks do not hang; clipping sees the global norm.

Run with `python -m pytest -q -m distributed tests/test_parallel_distributed.py` (deselected by default).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nmt_moe.moe import MoELayer, parallel

pytestmark = pytest.mark.distributed

WORLD = 2
D_MODEL, D_HIDDEN, EXPERTS, TOKENS = 8, 16, 4, 12  # TOKENS per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Any, *args: Any, world: int = WORLD) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes joined in a gloo process group."""
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _worker(rank: int, world: int, port: int, fn: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def make_layer(skewed: bool = False) -> MoELayer:
    """Deterministic routing (no noise) over diverse experts; `skewed` sends every token to experts 0 and 1,
    which live on rank 0."""
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_HIDDEN, EXPERTS, k=2, noise=False, w_importance=0.1, w_load=0.1)
    with torch.no_grad():
        layer.gate.w_gate.normal_()
        if skewed:
            layer.gate.w_gate.zero_()
            layer.gate.w_gate[:, :2] = 1.0
    return layer


def make_inputs(world: int, skewed: bool = False) -> torch.Tensor:
    """[W·N, d]; rank r takes rows r·N .. (r+1)·N. Skewed: positive, so experts 0 and 1 score highest."""
    torch.manual_seed(1)
    x = torch.randn(world * TOKENS, D_MODEL)
    return x.abs() + 0.1 if skewed else x


def output_weights(world: int) -> torch.Tensor:
    return torch.linspace(-1, 1, world * TOKENS * D_MODEL).view(world * TOKENS, D_MODEL)  # [W·N, d]


def layer_step(
    layer: MoELayer, x: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, aux_scale: int = 1
) -> dict[str, Any]:
    """Forward, loss = Σ weights · y (+ aux), backward; outputs and gradients."""
    x = x.clone().requires_grad_()
    out = layer(x, mask=mask)
    loss = (out.y * weights).sum() + aux_scale * out.aux_loss
    loss.backward()
    return {
        "y": out.y.detach(),
        "x_grad": x.grad,
        "aux": out.aux_loss.detach(),
        "load": out.load,
        "gate_grad": layer.gate.w_gate.grad.clone(),
        "w_in_grad": layer.experts.w_in.grad.clone(),
        "w_out_grad": layer.experts.w_out.grad.clone(),
    }


def _layer_worker(rank: int, world: int, out_dir: Path, skewed: bool, empty_rank: int | None) -> None:
    layer = make_layer(skewed)
    ep = parallel.init_expert_parallel(world)
    parallel.shard_experts(layer, ep)
    x = make_inputs(world, skewed)[rank * TOKENS : (rank + 1) * TOKENS]
    mask = torch.ones(TOKENS, dtype=torch.bool)
    if rank == empty_rank:
        mask[:] = False  # this rank routes nothing at all
    weights = output_weights(world)[rank * TOKENS : (rank + 1) * TOKENS]
    result = layer_step(layer, x, mask, weights)
    torch.save(result, out_dir / f"rank{rank}.pt")


@pytest.mark.parametrize(
    ("skewed", "empty_rank"), [(False, None), (True, None), (False, 1)], ids=["spread", "skewed", "empty"]
)
def test_sharded_layer_matches_one_process(tmp_path: Path, skewed: bool, empty_rank: int | None) -> None:
    spawn(_layer_worker, tmp_path, skewed, empty_rank)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    layer = make_layer(skewed)
    mask = torch.ones(WORLD * TOKENS, dtype=torch.bool)
    if empty_rank is not None:
        mask[empty_rank * TOKENS : (empty_rank + 1) * TOKENS] = False
    # the reference differentiates the sum over ranks of their losses, and each rank's aux loss is the
    # global one: it counts W times (DDP's mean over ranks then counts it once)
    ref = layer_step(layer, make_inputs(WORLD, skewed), mask, output_weights(WORLD), aux_scale=WORLD)
    y = torch.cat([r["y"] for r in ranks])
    torch.testing.assert_close(y, ref["y"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), ref["x_grad"], atol=1e-5, rtol=1e-5)
    for r in ranks:  # global statistics on every rank
        torch.testing.assert_close(r["aux"], ref["aux"], atol=1e-6, rtol=1e-5)
        assert torch.equal(r["load"], ref["load"])
    if skewed:
        assert ref["load"][2:].sum() == 0  # nothing went to rank 1's experts
    # expert shards: rank r holds experts [2r, 2r+2); their grads equal the reference's slices
    for name in ("w_in_grad", "w_out_grad"):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]), ref[name], atol=1e-5, rtol=1e-5)
    # the gate is replicated: the sum of the ranks' grads (which DDP averages) is the reference's
    torch.testing.assert_close(sum(r["gate_grad"] for r in ranks), ref["gate_grad"], atol=1e-5, rtol=1e-5)
