"""Greedy decoding with the experts sharded over ranks (validation BLEU under expert parallelism).

Every MoE call is an all-to-all that all ranks of the expert-parallel group must join, but ranks decode
different batches: one may have no sentence to decode in a batch, or finish many steps before another.
So every rank runs the same number of encoder calls (one per batch) and decoder steps (until the slowest
rank of the world is done, agreed by one all-reduce per step): a rank with nothing left feeds one dummy
row through each step and discards it. With dropless routing (required under expert parallelism) a dummy
row changes no other row's output, so each sentence is decoded exactly as `greedy_decode` decodes it alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from nmt_moe.decoding.search import BOS_ID, EOS_ID, block_eos_, eval_mode, max_target_lengths


def _anyone_running(running: bool, device: torch.device) -> bool:
    flag = torch.tensor([float(running)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a host sync per step: the price of agreeing to stop
    return bool(flag.item())


@torch.no_grad()
def greedy_decode_lockstep(
    model: Any, src: Tensor, src_lengths: Tensor, *, max_len_a: float = 1.5, max_len_b: float = 10
) -> list[list[int]]:
    """`greedy_decode`'s token ids for src [B, S] (B may be 0), joining every rank's MoE collectives.
    Collective: every rank calls it once per validation batch."""
    with eval_mode(model):
        device, batch = src.device, src.size(0)
        if batch == 0:  # nothing to decode here: one dummy sentence keeps this rank in step
            src, src_lengths = (
                torch.full((1, 1), EOS_ID, device=device),
                torch.ones(1, dtype=torch.long, device=device),
            )
        max_len = max_target_lengths(src_lengths, max_len_a, max_len_b)  # [B]
        enc = model.encode(src, src_lengths)
        state = model.init_state(enc)
        alive = torch.arange(src.size(0), device=device)  # [N] rows still decoding
        prev = torch.full((src.size(0),), BOS_ID, dtype=torch.long, device=device)  # [N]
        out = torch.full((src.size(0), int(max_len.max()) + 1), EOS_ID, dtype=torch.long, device=device)
        running, t = batch > 0, 0
        while _anyone_running(running, device):
            step = model.decode_step(prev, state, enc)
            if not running:  # a dummy row: keep feeding it, never read its output
                t += 1
                continue
            best = block_eos_(step.log_probs, t, 0).argmax(dim=-1)  # [N]
            out[alive, t] = best
            done = (best == EOS_ID) | (t + 1 >= max_len[alive])  # [N]
            keep = (~done).nonzero().squeeze(1)  # [N']
            if len(keep) == 0:  # finished: row 0 stays as the dummy
                running, keep = False, keep.new_zeros(1)
            alive, prev = alive[keep], best[keep]
            state, enc = step.state.index_select(keep), enc.index_select(keep)
            t += 1
        lengths = (out == EOS_ID).int().argmax(dim=1)  # [B] tokens before the first EOS
        return [row[:n] for row, n in zip(out[:batch].tolist(), lengths[:batch].tolist(), strict=True)]
