"""Sampling for back-translation: `nmt-moe translate --sampling [--temperature T] [--top-k K] [--top-p P]`.

Each step draws the next token from the model's distribution, sharpened or flattened by the temperature
and optionally cut to the K most likely tokens (top-k) and/or the smallest set holding probability P
(nucleus, top-p), renormalised. It is greedy decoding's loop with a draw in place of the argmax.

Reproducible whatever the batching: the uniform number a sentence draws with at step t comes from a
generator seeded by (--seed, the sentence's line number), never from a generator shared by the batch, so
the same seed gives the same output with any --max-tokens, --max-sentences or --stream grouping. The draw
is by inverse CDF over the candidates sorted by probability: one uniform per sentence and step.

The reported log_prob is the model's own (temperature 1, no truncation) log-probability of the sample,
EOS included: what `nmt-moe score` gives the same pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.decoding.options import DecodeOptions, SamplingOptions
from nmt_moe.decoding.search import max_target_lengths

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): spreads (seed, line) pairs apart


def sentence_uniforms(seed: int, sentence_ids: Sequence[int], lengths: Sequence[int], steps: int) -> Tensor:
    """[B, steps] uniforms in [0, 1); row b depends only on (seed, sentence_ids[b], lengths[b])."""
    out = torch.zeros(len(sentence_ids), steps)
    for row, (sentence, length) in enumerate(zip(sentence_ids, lengths, strict=True)):
        generator = torch.Generator().manual_seed((seed * _SEED_MIX + sentence) % 2**63)
        out[row, :length] = torch.rand(length, generator=generator)
    return out


def draw(log_probs: Tensor, uniform: Tensor, options: SamplingOptions) -> Tensor:
    """One token per row of log_probs [N, V] by inverse CDF with uniform [N]: tokens [N]."""
    logits = log_probs / options.temperature  # [N, V]; -inf (a blocked EOS) stays -inf
    if options.top_k > 0:
        sorted_logits, order = logits.topk(min(options.top_k, logits.size(1)), dim=1)  # [N, K] best first
    else:
        sorted_logits, order = logits.sort(dim=1, descending=True)  # [N, V]
    probs = torch.softmax(sorted_logits, dim=1)  # [N, K]
    if options.top_p < 1:
        mass_before = probs.cumsum(dim=1) - probs  # [N, K] probability of the better candidates
        probs = probs.masked_fill(mass_before >= options.top_p, 0.0)  # the best one always stays
    cdf = probs.cumsum(dim=1)  # [N, K]; zero-probability candidates form a suffix (sorted order)
    target = uniform.unsqueeze(1) * cdf[:, -1:]  # [N, 1]
    position = torch.searchsorted(cdf, target, right=True)  # [N, 1]
    last_kept = (probs > 0).sum(dim=1, keepdim=True) - 1  # [N, 1] guards target == total by rounding
    return order.gather(1, torch.minimum(position, last_kept)).squeeze(1)


def sample_decode(
    model: Any,
    src: Tensor,
    src_lengths: Tensor,
    sentence_ids: Sequence[int],
    options: SamplingOptions,
    *,
    max_len_a: float = DecodeOptions.max_len_a,
    max_len_b: float = DecodeOptions.max_len_b,
    min_len: int = DecodeOptions.min_len,
) -> tuple[list[list[int]], Tensor]:
    """One sample per sentence of src [B, S]: token ids (no BOS/EOS) and model log-probs [B]."""
    max_len = max_target_lengths(src_lengths, max_len_a, max_len_b)  # [B]
    uniforms = sentence_uniforms(options.seed, sentence_ids, max_len.tolist(), int(max_len.max()))
    uniforms = uniforms.to(src.device)  # [B, T]

    def pick(log_probs: Tensor, alive: Tensor, t: int) -> tuple[Tensor, Tensor]:
        tokens = draw(log_probs, uniforms[alive, t], options)  # [N]
        return log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1), tokens

    return greedy_decode(
        model, src, src_lengths, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len, pick=pick
    )
