"""Forced decoding (`nmt-moe score`, nmt_moe/cli/score.py): the model's log-probability of given
translations, batched.

For each (source, target) line pair the score is log P(target + EOS | source), summed over target tokens:
the same number beam search reports as a hypothesis' `log_prob` (its score without length or coverage
penalty) when it produces that target and ends it with EOS. `--per-token` writes the log-probability of
every target token and of the final EOS instead. Typical uses: filtering back-translated data, reranking
n-best lists, checking a model against a reference.

Scoring is teacher forcing (`Seq2Seq.forward`), one pass per batch, not a search: far cheaper than
translating. Pairs are sorted by length and batched by `--max-tokens` as in `translate`; the output keeps
input order, one line per pair. An empty (or whitespace-only) source line is scored as the empty source
(EOS alone); an empty target line scores the EOS alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nmt_moe.data.batching import make_batches, pad_ids
from nmt_moe.data.text_io import encode_sources, target_prefix
from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from nmt_moe.decoding.options import BatchOptions
from nmt_moe.decoding.search import eval_mode


@torch.no_grad()
def token_log_probs(
    model: Any, sources: Sequence[list[int]], targets: Sequence[list[int]]
) -> list[list[float]]:
    """Per pair, log P(y_t | y_<t, x) for every target token and the final EOS, for one batch.

    sources: model input ids (EOS included); targets: target ids without BOS/EOS.
    """
    device = next(model.parameters()).device
    src = pad_ids(sources).to(device)  # [B, S]
    src_lengths = torch.tensor([len(s) for s in sources], device=device)  # [B]
    tgt_in = pad_ids([[BOS_ID, *t] for t in targets]).to(device)  # [B, T] BOS + target
    tgt_out = pad_ids([[*t, EOS_ID] for t in targets]).to(device)  # [B, T] target + EOS
    with eval_mode(model):
        logits = model(src, src_lengths, tgt_in).logits  # [B, T, V]
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(2, tgt_out.unsqueeze(2)).squeeze(2)  # [B, T]
    return [row[: len(t) + 1] for row, t in zip(log_probs.tolist(), targets, strict=True)]


def score_pairs(
    model: Any,
    sources: Sequence[list[int]],
    targets: Sequence[list[int]],
    *,
    max_tokens: int = BatchOptions.max_tokens,
    max_sentences: int = BatchOptions.max_sentences,
) -> list[list[float]]:
    """Per-token log-probs for every pair, in input order; batches sorted by length like `translate`."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    lengths = [max(len(s), len(t) + 1) for s, t in zip(sources, targets, strict=True)]
    results: list[list[float]] = [[] for _ in sources]
    for batch in make_batches(lengths, max_tokens, max_sentences):
        scored = token_log_probs(model, [sources[i] for i in batch], [targets[i] for i in batch])
        for i, per_token in zip(batch, scored, strict=True):
            results[i] = per_token
    return results


def encode_pairs(
    tokenizer: Tokenizer,
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    *,
    max_input_tokens: int,
    target_lang: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Model input ids per source (as `translate` builds them; `warn` hears of truncated lines) and target
    ids per target line."""
    prefix = target_prefix(tokenizer, target_lang)
    sources = encode_sources(src_lines, tokenizer, max_input_tokens=max_input_tokens, prefix=prefix,
                             warn=warn)  # fmt: skip
    sources = [s or [*prefix, EOS_ID] for s in sources]  # an empty source is scored as EOS alone
    encoded = tokenizer.encode(tgt_lines)
    targets = [[] if line.isspace() else ids for line, ids in zip(tgt_lines, encoded, strict=True)]
    return sources, targets


def format_scores(per_token: Sequence[list[float]], per_token_output: bool) -> str:
    """One line per pair: the summed log-prob, or the per-token log-probs separated by spaces."""
    if per_token_output:
        return "".join(" ".join(f"{x:.6f}" for x in row) + "\n" for row in per_token)
    return "".join(f"{sum(row):.6f}\n" for row in per_token)
