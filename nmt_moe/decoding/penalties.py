"""GNMT hypothesis scoring (Wu et al. 2016, section 7).

A beam search that ranks finished hypotheses by raw log-probability prefers short outputs and outputs
that ignore parts of the source. GNMT rescales by a length penalty and adds a coverage penalty:

    s(Y, X) = log P(Y | X) / lp(Y) + cp(X; Y)
    lp(Y)   = ((5 + |Y|) / 6) ** alpha
    cp(X;Y) = beta * sum_i log(min(sum_t attn[t, i], 1))     over the real (non-padding) source positions i

With alpha = beta = 0 the score is the model log-probability itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """lp(Y) = ((5 + |Y|) / 6) ** alpha for each length in `lengths` (any shape); 1 when alpha == 0."""
    return ((5.0 + lengths.to(torch.float32)) / 6.0) ** alpha


def coverage_penalty(attention_sum: Tensor, src_mask: Tensor, beta: float) -> Tensor:
    """beta * sum_i log(min(attention_sum_i, 1)) over real source positions.

    attention_sum: [N, S] attention summed over the target steps of each hypothesis;
    src_mask: [N, S] bool, True at real source tokens. Returns [N]; 0 everywhere when beta == 0.
    A source token never attended to gives log(0) = -inf; it is clamped to log(1e-6) per position so a
    hypothesis stays comparable (and finite) rather than ruled out.
    """
    if beta == 0.0:
        return attention_sum.new_zeros(attention_sum.size(0))
    covered = attention_sum.clamp(min=1e-6, max=1.0).log()  # [N, S], <= 0
    return beta * covered.masked_fill(~src_mask, 0.0).sum(dim=1)
