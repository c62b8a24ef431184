"""Batched greedy decoding, shared by validation during training and by `nmt-moe translate --beam 1`.

It is beam search with one beam and no penalties (same tokens, same scores:
tests/decoding/test_beam.py), without the beam bookkeeping: one argmax per row and step. The maximum-length
rule, eval mode, token ids and the EOS block come from `search.py`, as for beam search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from nmt_moe.decoding.options import DecodeOptions
from nmt_moe.decoding.search import BOS_ID, EOS_ID, block_eos_, eval_mode, max_target_lengths


@torch.no_grad()
def greedy_decode(
    model: Any,
    src: Tensor,
    src_lengths: Tensor,
    *,
    max_len_a: float = DecodeOptions.max_len_a,
    max_len_b: float = DecodeOptions.max_len_b,
    min_len: int = DecodeOptions.min_len,
    pick: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]] | None = None,
) -> tuple[list[list[int]], Tensor]:
    """Most probable next token at each step for a batch: src [B, S], src_lengths [B].

    Returns token ids per sentence (no BOS/EOS, stopped at EOS) and scores [B]: the summed log-probs of the
    chosen tokens, EOS included. A sentence produces at most `max_target_lengths` tokens (EOS included) and
    no EOS before `min_len` tokens. Sentences drop out of the batch as they finish, so each is decoded
    exactly as it would be alone. Runs the model in eval mode and restores its mode after.
    pick(log_probs [N, V], alive [N] original rows, t) -> (log-prob [N], token [N]) replaces the argmax
    (sampling.py draws there).
    """
    with eval_mode(model):
        batch, device = src.size(0), src.device
        max_len = max_target_lengths(src_lengths, max_len_a, max_len_b)  # [B]
        steps = int(max_len.max())
        enc = model.encode(src, src_lengths)
        state = model.init_state(enc)
        alive = torch.arange(batch, device=device)  # [N] rows of the original batch still decoding
        prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)  # [N]
        scores = torch.zeros(batch, device=device)  # [B]
        out = torch.full((batch, steps + 1), EOS_ID, dtype=torch.long, device=device)  # [B, T+1] ends in EOS
        for t in range(steps):
            step = model.decode_step(prev, state, enc)
            log_probs = block_eos_(step.log_probs, t, min_len)  # [N, V]
            best_lp, best = log_probs.max(dim=-1) if pick is None else pick(log_probs, alive, t)  # [N]
            scores[alive] += best_lp
            out[alive, t] = best
            done = (best == EOS_ID) | (t + 1 >= max_len[alive])  # [N]
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)  # [N']
            alive, prev = alive[keep], best[keep]
            state, enc = step.state.index_select(keep), enc.index_select(keep)
        lengths = (out == EOS_ID).int().argmax(dim=1)  # [B] position of the first EOS = tokens produced
        return [row[:n] for row, n in zip(out.tolist(), lengths.tolist(), strict=True)], scores
