"""Batched greedy decoding, shared by validation during training and by `nmt-moe translate`."""

from __future__ import annotations

import torch
from torch import Tensor

from nmt_moe.data.tokenizer import BOS_ID, EOS_ID
from nmt_moe.models import Seq2Seq


@torch.no_grad()
def greedy_decode(
    model: Seq2Seq, src: Tensor, src_lengths: Tensor, *, max_len_a: float = 1.5, max_len_b: int = 10
) -> tuple[list[list[int]], Tensor]:
    """Most probable next token at each step for a batch: src [B, S], src_lengths [B].

    Returns token ids per sentence (no BOS/EOS, stopped at EOS) and scores [B]: the summed log-probs of the
    chosen tokens, EOS included. A sentence produces at most int(max_len_a * src_len + max_len_b) tokens
    (EOS included). Sentences drop out of the batch as they finish, so each is decoded exactly as it would be
    alone. Runs the model in eval mode and restores its mode after.
    """
    was_training = model.training
    model.eval()
    try:
        B = src.shape[0]
        max_len = (max_len_a * src_lengths.float() + max_len_b).long().clamp(min=1)  # [B]
        enc = model.encode(src, src_lengths)
        state = model.init_state(enc)
        alive = torch.arange(B, device=src.device)  # rows of the original batch still decoding
        prev = torch.full((B,), BOS_ID, dtype=torch.long, device=src.device)
        scores = torch.zeros(B, device=src.device)
        tokens: list[list[int]] = [[] for _ in range(B)]
        for t in range(int(max_len.max())):
            step = model.decode_step(prev, state, enc)
            best_lp, best = step.log_probs.max(dim=-1)  # [N]
            scores[alive] += best_lp
            for row, token in zip(alive.tolist(), best.tolist(), strict=True):
                if token != EOS_ID:
                    tokens[row].append(token)
            done = (best == EOS_ID) | (t + 1 >= max_len[alive])  # [N]
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)  # [N']
            alive, prev = alive[keep], best[keep]
            state, enc = step.state.index_select(keep), enc.index_select(keep)
        return tokens, scores
    finally:
        model.train(was_training)
