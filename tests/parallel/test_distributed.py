"""Expert parallelism with 2 CPU processes (gloo): the sharded layer and a sharded training step match one
process on the concatenated batch; skewed routing and empty ranks do not hang; clipping sees the global norm.

Run with `python -m pytest -q -m distributed tests/parallel/test_distributed.py` (deselected by default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from helpers.distributed import WORLD, free_port, spawn

from nmt_moe.moe import MoELayer, collectives, parallel

pytestmark = pytest.mark.distributed

D_MODEL, D_HIDDEN, EXPERTS, TOKENS = 8, 16, 4, 12  # TOKENS per rank


GATE_CASES = {  # every gate, deterministic (no gate noise), every balancing loss switched on
    "noisy_topk": dict(gate="noisy_topk", k=2, noise=False, w_importance=0.1, w_load=0.1),
    "softmax_topk": dict(gate="softmax_topk", k=2, w_balance=0.1, w_z=0.1),
    "switch": dict(gate="switch", k=1, w_balance=0.1, w_z=0.1),
    "sigmoid": dict(gate="sigmoid", k=2, w_balance=0.1),
    "batchwise": dict(gate="batchwise", k=2, w_importance=0.1, w_threshold=0.1),
    "hierarchical": dict(
        gate="hierarchical",
        num_experts=8,
        num_groups=2,
        k_group=1,
        k=2,
        noise=False,
        w_importance=0.1,
        w_load=0.1,
    ),  # fmt: skip
    "shared_and_bias": dict(
        gate="softmax_topk",
        k=2,
        w_balance=0.1,
        num_shared_experts=1,
        loss_free_bias=True,
        bias_update_rate=0.1,
    ),
}


def make_layer(case: str = "noisy_topk", skewed: bool = False) -> MoELayer:
    """Deterministic routing over diverse experts; `skewed` (noisy_topk) sends every token to experts 0 and
    1, which live on rank 0."""
    torch.manual_seed(0)
    layer = MoELayer(**{"d_model": D_MODEL, "d_hidden": D_HIDDEN, "num_experts": EXPERTS, **GATE_CASES[case]})
    with torch.no_grad():
        for name, param in layer.gate.named_parameters():
            if name.endswith("w_gate"):
                param.normal_()
        if skewed:
            layer.gate.w_gate.zero_()
            layer.gate.w_gate[:, :2] = 1.0
    return layer


def make_inputs(world: int, skewed: bool = False, tied: bool = False) -> torch.Tensor:
    """[W·N, d]; rank r takes rows r·N .. (r+1)·N. Skewed: positive, so experts 0 and 1 score highest.
    Tied: 7 distinct rows repeated over all ranks, so batchwise top-m cuts through groups of equal scores."""
    torch.manual_seed(1)
    x = torch.randn(world * TOKENS, D_MODEL)
    if tied:
        x = x[torch.arange(world * TOKENS) % 7]
    return x.abs() + 0.1 if skewed else x


def output_weights(world: int) -> torch.Tensor:
    return torch.linspace(-1, 1, world * TOKENS * D_MODEL).view(world * TOKENS, D_MODEL)  # [W·N, d]


def layer_step(
    layer: MoELayer, x: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, aux_scale: int = 1
) -> dict[str, Any]:
    """Forward, loss = Σ weights · y (+ aux), backward, `update_bias()`; outputs, statistics, gradients."""
    x = x.clone().requires_grad_()
    out = layer(x, mask=mask)
    loss = (out.y * weights).sum() + aux_scale * out.aux_loss
    loss.backward()
    layer.update_bias()
    return {
        "y": out.y.detach(),
        "x_grad": x.grad,
        "aux": out.aux_loss.detach(),
        "losses": out.losses,
        "load": out.load,
        "local_load": torch.bincount(out.expert_index[out.expert_index >= 0], minlength=layer.num_experts),
        "bias": layer.expert_bias.clone() if layer.loss_free_bias else None,
        "replicated_grads": {  # router, thresholds, shared experts
            name: p.grad.clone() for name, p in layer.named_parameters() if not name.startswith("experts.")
        },
        "w_in_grad": layer.experts.w_in.grad.clone(),
        "w_out_grad": layer.experts.w_out.grad.clone(),
    }


def _layer_worker(
    rank: int, world: int, out_dir: Path, case: str, skewed: bool, empty_rank: int | None, tied: bool
) -> None:
    layer = make_layer(case, skewed)
    ep = collectives.init_expert_parallel(world)
    parallel.shard_experts(layer, ep)
    x = make_inputs(world, skewed, tied)[rank * TOKENS : (rank + 1) * TOKENS]
    mask = torch.ones(TOKENS, dtype=torch.bool)
    if rank == empty_rank:
        mask[:] = False  # this rank routes nothing at all
    weights = output_weights(world)[rank * TOKENS : (rank + 1) * TOKENS]
    result = layer_step(layer, x, mask, weights)
    parallel.unshard_experts(layer)  # back to local routing: no collective left in the gate
    assert not getattr(layer.gate, "global_batch", False)
    torch.save(result, out_dir / f"rank{rank}.pt")


LAYER_CASES = [  # (gate case, skewed, empty rank, tied)
    ("noisy_topk", False, None, False),
    ("noisy_topk", True, None, False),
    *[(case, False, empty, False) for case in GATE_CASES for empty in (None, 1) if case != "noisy_topk"],
    ("noisy_topk", False, 1, False),
    ("batchwise", False, None, True),
]


def _case_id(case: str, skewed: bool, empty_rank: int | None, tied: bool) -> str:
    scenario = "skewed" if skewed else "empty" if empty_rank is not None else "tied" if tied else "spread"
    return f"{case}-{scenario}"


@pytest.mark.parametrize(
    ("case", "skewed", "empty_rank", "tied"), LAYER_CASES, ids=[_case_id(*c) for c in LAYER_CASES]
)
def test_sharded_layer_matches_one_process(
    tmp_path: Path, case: str, skewed: bool, empty_rank: int | None, tied: bool
) -> None:
    spawn(_layer_worker, tmp_path, case, skewed, empty_rank, tied)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    layer = make_layer(case, skewed)
    mask = torch.ones(WORLD * TOKENS, dtype=torch.bool)
    if empty_rank is not None:
        mask[empty_rank * TOKENS : (empty_rank + 1) * TOKENS] = False
    x = make_inputs(WORLD, skewed, tied)
    if tied:  # some expert's m-th score is shared by tokens it takes and tokens it does not
        probs = (x @ layer.gate.w_gate).softmax(-1)  # [W·N, E]
        m = layer.k * WORLD * TOKENS // layer.num_experts
        kth = probs.topk(m, dim=0).values[-1]
        assert bool(((probs > kth).sum(0) + (probs == kth).sum(0) > m).any())
    # the reference differentiates the sum over ranks of their losses, and each rank's aux loss is the
    # global one: it counts W times (DDP's mean over ranks then counts it once)
    ref = layer_step(layer, x, mask, output_weights(WORLD), aux_scale=WORLD)
    y = torch.cat([r["y"] for r in ranks])
    torch.testing.assert_close(y, ref["y"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), ref["x_grad"], atol=1e-5, rtol=1e-5)
    assert all(float(value) > 0 for value in ref["losses"].values())  # every balancing loss is in play
    for r in ranks:  # global statistics and losses on every rank
        torch.testing.assert_close(r["aux"], ref["aux"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["losses"], ref["losses"], atol=1e-6, rtol=1e-5)
        assert torch.equal(r["load"], ref["load"])
    if empty_rank is None and not skewed:  # the ranks' own loads differ from the global one (so the
        # checks above would catch per-rank statistics)
        assert not torch.equal(ranks[0]["local_load"] * WORLD, ref["load"])
    if skewed:
        assert ref["load"][2:].sum() == 0  # nothing went to rank 1's experts
    if ref["bias"] is not None:  # loss-free bias: every rank nudges it from the global load
        assert bool(ref["bias"].ne(0).any())
        for r in ranks:
            torch.testing.assert_close(r["bias"], ref["bias"], atol=0, rtol=0)
    # expert shards: rank r holds the r-th half of the experts; their grads equal the reference's slices
    for name in ("w_in_grad", "w_out_grad"):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]), ref[name], atol=1e-5, rtol=1e-5)
    # the gate (and shared experts) are replicated: the sum of the ranks' grads (which DDP averages) is the
    # reference's
    assert ref["replicated_grads"].keys() == ranks[0]["replicated_grads"].keys()
    for name, grad in ref["replicated_grads"].items():
        total = sum(r["replicated_grads"][name] for r in ranks)
        torch.testing.assert_close(total, grad, atol=1e-5, rtol=1e-5, msg=name)


def _clip_worker(rank: int, world: int, out_dir: Path) -> None:
    ep = collectives.init_expert_parallel(world)
    replicated, full_expert = clip_grads()
    shard = torch.nn.Parameter(full_expert.detach()[ep.shard(EXPERTS)].clone())
    shard.grad = full_expert.grad[ep.shard(EXPERTS)].clone()
    norm = collectives.clip_grad_norm_([replicated, shard], [shard], 1.0, ep)
    torch.save({"norm": norm, "replicated": replicated.grad, "shard": shard.grad}, out_dir / f"clip{rank}.pt")


def clip_grads() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """A replicated parameter and a full expert bank with gradients; the experts dominate the norm and
    their squared norms differ between the two shards."""
    torch.manual_seed(3)
    replicated = torch.nn.Parameter(torch.zeros(5))
    replicated.grad = torch.randn(5)
    experts = torch.nn.Parameter(torch.zeros(EXPERTS, 3))
    experts.grad = torch.randn(EXPERTS, 3) * torch.tensor([[1.0], [2.0], [5.0], [9.0]])
    return replicated, experts


def test_clipping_with_sharded_experts_uses_the_global_norm(tmp_path: Path) -> None:
    spawn(_clip_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"clip{r}.pt") for r in range(WORLD)]
    replicated, experts = clip_grads()
    norm = torch.nn.utils.clip_grad_norm_([replicated, experts], 1.0)
    assert norm > 5  # clipping is active
    for r in ranks:
        torch.testing.assert_close(r["norm"], norm)
        torch.testing.assert_close(r["replicated"], replicated.grad)
    torch.testing.assert_close(torch.cat([r["shard"] for r in ranks]), experts.grad)


# --- training steps through Lightning's DDP strategy ------------------------------------------------

VOCAB, STEPS, CLIP = 24, 2, 0.05


MODULE_GATES = {  # Seq2Seq MoE settings per case; no gate noise, so routing is deterministic
    "noisy_topk": dict(num_experts=4, k=2, noise=False, w_importance=0.1, w_load=0.1),
    "hierarchical": dict(
        num_experts=8,
        k=2,
        gate="hierarchical",
        num_groups=2,
        k_group=1,
        noise=False,
        w_importance=0.1,
        w_load=0.1,
    ),
    "batchwise": dict(num_experts=4, k=2, gate="batchwise", w_importance=0.1),
}


def make_module(expert_parallel_size: int, gate: str = "noisy_topk") -> Any:
    """A small MoE Seq2Seq in a TranslationModule: no dropout, no gate noise, random (diverse) routers."""
    from nmt_moe.models import Seq2SeqConfig
    from nmt_moe.moe import MoEConfig
    from nmt_moe.training.module import TranslationModule

    torch.manual_seed(0)
    config = Seq2SeqConfig(
        VOCAB, embed_dim=8, hidden_size=8, attention="dot", input_feeding=False, dropout=0.0,
        moe=MoEConfig(d_hidden=16, **MODULE_GATES[gate]),
    )  # fmt: skip
    module = TranslationModule(
        config, label_smoothing=0.1, lr=0.01, warmup_steps=0, schedule="constant", val_max_sentences=0,
        expert_parallel_size=expert_parallel_size,
    )  # fmt: skip
    with torch.no_grad():  # the model is built first in the module: the same draws as built on its own
        for name, param in module.model.named_parameters():
            if name.endswith("w_gate"):  # routers of every MoE layer (hierarchical: both levels)
                param.normal_()
    return module


def make_batches(world: int) -> list[list[dict[str, torch.Tensor]]]:
    """batches[step][rank]; every rank's targets have the same number of real tokens, so the mean loss over
    the concatenated batch is the mean of the ranks' losses."""
    torch.manual_seed(2)
    out = []
    for _ in range(STEPS):
        per_rank = []
        for _ in range(world):
            lengths = torch.tensor([5, 3, 4])
            src = torch.randint(4, VOCAB, (3, 5))
            src[1, 3:] = 0
            src[2, 4:] = 0
            tgt = torch.randint(4, VOCAB, (3, 6))
            tgt[:, 0] = 2  # BOS
            per_rank.append({"src": src, "src_lengths": lengths, "tgt": tgt, "index": torch.arange(3)})
        out.append(per_rank)
    return out


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def run_training(module: Any, batches: list[dict[str, torch.Tensor]], **trainer_args: Any) -> dict[str, Any]:
    """Fit for len(batches) steps; returns the losses and, after the last step, the full weights and the
    (clipped) gradients, expert shards gathered."""
    import pytorch_lightning as pl

    record: dict[str, Any] = {"loss": []}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            record["loss"].append(outputs["loss"].detach())
            grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            gather_full_experts(grads, pl_module)
            gather_full_experts(params, pl_module)
            record["grads"], record["params"] = grads, params

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=len(batches), gradient_clip_val=CLIP, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[Record()],
        **trainer_args,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    record["loss"] = torch.stack(record["loss"])
    return record


def gather_full_experts(state: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    """Test-only: replace this rank's expert shards in `state` (keys as in named_parameters) by the full
    [E, ...] tensors, to compare with one process (collective)."""
    for name, layer in parallel.moe_layers(module):
        ep = layer.expert_parallel
        for param, _ in layer.experts.named_parameters() if ep is not None else []:
            key = f"{name}.experts.{param}"
            if key in state:
                state[key] = collectives.all_gather_cat(state[key], ep.group, ep.size)


def _lightning_worker(
    rank: int, world: int, port: int, out_dir: Path, expert_parallel_size: int, gate: str
) -> None:
    """Started like torchrun starts a rank: Lightning sees LOCAL_RANK and joins instead of launching."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
        LOCAL_RANK=str(rank), RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    batches = [step[rank] for step in make_batches(world)]
    from nmt_moe.training.expert_parallel import ExpertParallelStrategy

    strategy = ExpertParallelStrategy() if expert_parallel_size > 1 else "ddp"
    record = run_training(make_module(expert_parallel_size, gate), batches, strategy=strategy, devices=world)
    torch.save(record, out_dir / f"train{rank}.pt")


@pytest.mark.parametrize(
    ("world", "expert_parallel_size", "gate"),
    [(2, 2, "noisy_topk"), (4, 2, "noisy_topk"), (2, 2, "hierarchical"), (2, 2, "batchwise")],
    ids=["2-ranks-ep2", "4-ranks-ep2-2-replicas", "2-ranks-ep2-hierarchical", "2-ranks-ep2-batchwise"],
)
def test_expert_parallel_training_steps_match_one_process(
    tmp_path: Path, world: int, expert_parallel_size: int, gate: str
) -> None:
    args = (world, free_port(), tmp_path, expert_parallel_size, gate)
    mp.spawn(_lightning_worker, args=args, nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"train{r}.pt") for r in range(world)]
    reference = run_training(make_module(1, gate), [concat(step) for step in make_batches(world)], devices=1)

    ep_loss = torch.stack([r["loss"] for r in ranks]).mean(0)  # DDP's objective: the mean of rank losses
    torch.testing.assert_close(ep_loss, reference["loss"], atol=1e-5, rtol=1e-5)
    grad_norm = torch.cat([g.reshape(-1) for g in reference["grads"].values()]).norm()
    assert grad_norm == pytest.approx(CLIP, rel=1e-3)  # the step was clipped (to CLIP)
    for rank in ranks:
        assert rank["params"].keys() == reference["params"].keys()
        for name, value in reference["params"].items():
            torch.testing.assert_close(rank["params"][name], value, atol=1e-5, rtol=1e-5, msg=name)
        for name, value in reference["grads"].items():
            torch.testing.assert_close(rank["grads"][name], value, atol=1e-6, rtol=1e-4, msg=name)


# --- greedy decoding in lockstep (validation BLEU with sharded experts) -------------------------------------


def _decoding_model() -> torch.nn.Module:
    from nmt_moe.models import Seq2Seq, Seq2SeqConfig
    from nmt_moe.moe import MoEConfig

    torch.manual_seed(3)
    moe = MoEConfig(num_experts=EXPERTS, k=2, d_hidden=16)
    config = Seq2SeqConfig(
        vocab_size=40, embed_dim=16, hidden_size=16, encoder_layers=2, decoder_layers=2, moe=moe
    )
    model = Seq2Seq(config)
    return model.eval()


def _sentences() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank and batch: rank 0 decodes 3 then 1 sentences, rank 1 none then 2 (sources of 2-9 tokens)."""
    g = torch.Generator().manual_seed(4)
    lengths = {(0, 0): [9, 2, 5], (0, 1): [7], (1, 0): [], (1, 1): [3, 8]}
    batches = {}
    for key, lens in lengths.items():
        src = torch.full((len(lens), max(lens, default=1)), 0, dtype=torch.long)
        for row, n in enumerate(lens):
            src[row, :n] = torch.randint(4, 40, (n,), generator=g)
        batches[key] = (src, torch.tensor(lens, dtype=torch.long))
    return batches


def _lockstep_worker(rank: int, world: int, out_dir: Path) -> None:
    from nmt_moe.training.lockstep import greedy_decode_lockstep

    model = _decoding_model()
    parallel.shard_experts(model, collectives.init_expert_parallel(world))
    hyps = [
        greedy_decode_lockstep(model, *_sentences()[(rank, b)], max_len_a=1.0, max_len_b=4) for b in (0, 1)
    ]
    torch.save(hyps, out_dir / f"hyps{rank}.pt")


def test_lockstep_greedy_decoding_with_sharded_experts_matches_one_process(tmp_path: Path) -> None:
    """Ranks with different numbers of sentences (none at all in one batch) and of decoding steps all join
    every all-to-all, and each sentence decodes to what `greedy_decode` gives in one process."""
    from nmt_moe.decoding.greedy import greedy_decode

    spawn(_lockstep_worker, tmp_path)
    model = _decoding_model()
    steps = set()
    for (rank, b), (src, lengths) in _sentences().items():
        got = torch.load(tmp_path / f"hyps{rank}.pt")[b]
        expected = greedy_decode(model, src, lengths, max_len_a=1.0, max_len_b=4)[0] if len(lengths) else []
        assert got == expected, (rank, b)
        steps |= {len(h) for h in expected}
    assert len(steps) > 2  # sentences stopped at different steps (their maximum lengths)
