"""Translate lines with a model: encode, batch by length, search, put results back in input order.

The library half of `nmt-moe translate` (its command line lives in `nmt_moe/cli/translate.py`); `evaluate
-m`, `serve` and the benchmarks call it too. Guarantees, in the order the work happens:
  1. lines are read and checked by `nmt_moe.data.text_io` (strict UTF-8, the bad line named);
  2. an empty line or one of only (Unicode) whitespace becomes an empty output line without reaching the
     model; a line longer than `max_input_tokens` is truncated, with a warning naming its line number;
  3. sentences are sorted by length and batched by `max_tokens` (padded source tokens per batch; beam
     search multiplies the decoder batch by the beam size), results are put back in input order;
  4. the output has one line per input line: text (the best hypothesis) or JSON Lines carrying the score,
     the token ids, the n-best list and optionally the experts each target token was routed to.

Start-up matters here (users pay it per file): this module imports neither Lightning nor `datasets`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import torch
from torch import Tensor

from nmt_moe.data.batching import make_batches, pad_ids
from nmt_moe.data.text_io import encode_sources, one_line, read_lines, target_prefix
from nmt_moe.data.tokenizer import Tokenizer
from nmt_moe.decoding.beam import Hypothesis, beam_search
from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.decoding.options import BatchOptions, DecodeOptions
from nmt_moe.decoding.sampling import sample_decode
from nmt_moe.decoding.streaming import read_line_groups

# --- decoding ----------------------------------------------------------------------------------------------


def translate_sources(
    model: Any,
    sources: Sequence[list[int]],
    options: DecodeOptions,
    *,
    max_tokens: int = BatchOptions.max_tokens,
    max_sentences: int = BatchOptions.max_sentences,
    progress: bool = False,
    first_index: int = 0,
) -> list[list[Hypothesis]]:
    """n-best lists per source (empty list for an empty source), in the order of `sources`.

    first_index: the line index of sources[0] in the whole input (sampling seeds each line by its index).
    """
    device = next(model.parameters()).device
    results: list[list[Hypothesis]] = [[] for _ in sources]
    batches = make_batches([len(s) for s in sources], max_tokens, max_sentences)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(map(len, batches)), unit="sent", file=sys.stderr, dynamic_ncols=True)
    for batch in batches:
        lengths = torch.tensor([len(sources[i]) for i in batch])
        src = pad_ids([sources[i] for i in batch])  # [B, S]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
            ids = [first_index + i for i in batch]
            hyps = search_batch(model, src.to(device), lengths.to(device), options, sentence_ids=ids)
        for i, nbest in zip(batch, hyps, strict=True):
            results[i] = nbest
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results


def search_batch(
    model: Any,
    src: Tensor,
    lengths: Tensor,
    options: DecodeOptions,
    sentence_ids: Sequence[int] | None = None,
) -> list[list[Hypothesis]]:
    """n-best lists for one padded batch src [B, S], lengths [B]: greedy where it is equivalent, else beam;
    or one sample per sentence (seeded by sentence_ids, the sentences' line indices; default 0..B-1)."""
    if options.sampling is not None:
        ids = list(range(src.size(0))) if sentence_ids is None else sentence_ids
        tokens, scores = sample_decode(
            model, src, lengths, ids, options.sampling, max_len_a=options.max_len_a,
            max_len_b=options.max_len_b, min_len=options.min_len,
        )  # fmt: skip
        return [[Hypothesis(t, s, s)] for t, s in zip(tokens, scores.tolist(), strict=True)]
    if options.is_greedy:
        tokens, scores = greedy_decode(
            model, src, lengths, max_len_a=options.max_len_a, max_len_b=options.max_len_b,
            min_len=options.min_len,
        )  # fmt: skip
        return [[Hypothesis(t, s, s)] for t, s in zip(tokens, scores.tolist(), strict=True)]
    return beam_search(
        model, src, lengths, beam_size=options.beam_size, nbest=options.nbest, alpha=options.alpha,
        beta=options.beta, max_len_a=options.max_len_a, max_len_b=options.max_len_b,
        min_len=options.min_len, return_experts=options.experts,
    )  # fmt: skip


def format_output(
    results: Sequence[list[Hypothesis]],
    tokenizer: Tokenizer,
    output_format: str,
    experts: bool,
    first_line: int = 1,
) -> str:
    """The whole output text: one line per input line, text (best hypothesis) or JSON Lines (whose
    "line" fields count from `first_line`)."""
    best_texts = tokenizer.decode([nbest[0].tokens if nbest else [] for nbest in results])
    if output_format == "text":
        return "".join(one_line(text) + "\n" for text in best_texts)
    out = []
    for number, (nbest, text) in enumerate(zip(results, best_texts, strict=True), start=first_line):
        record: dict[str, Any] = {"line": number, "translation": one_line(text)}
        best = nbest[0] if nbest else None
        record["score"] = best.score if best else None
        record["log_prob"] = best.log_prob if best else None
        record["tokens"] = best.tokens if best else []
        if len(nbest) > 1:
            texts = tokenizer.decode([h.tokens for h in nbest])
            record["nbest"] = [
                {"translation": one_line(t), "score": h.score, "log_prob": h.log_prob, "tokens": h.tokens}
                for t, h in zip(texts, nbest, strict=True)
            ]
        if experts:
            record["experts"] = best.experts if best else []
        out.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(out)


def translate_lines(
    model: Any,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    options: DecodeOptions,
    *,
    max_tokens: int = BatchOptions.max_tokens,
    max_sentences: int = BatchOptions.max_sentences,
    max_input_tokens: int = BatchOptions.max_input_tokens,
    target_lang: str | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[list[Hypothesis]]:
    """Encode, batch, search: the library form of `nmt-moe translate` (n-best lists in input order)."""
    prefix = target_prefix(tokenizer, target_lang)
    sources = encode_sources(lines, tokenizer, max_input_tokens=max_input_tokens, prefix=prefix, warn=warn)
    return translate_sources(
        model, sources, options, max_tokens=max_tokens, max_sentences=max_sentences, progress=progress
    )


def stream_translate(
    model: Any,
    tokenizer: Tokenizer,
    fd: int,
    out: BinaryIO,
    options: DecodeOptions,
    *,
    output_format: str = "text",
    max_tokens: int = BatchOptions.max_tokens,
    max_sentences: int = BatchOptions.max_sentences,
    max_input_tokens: int = BatchOptions.max_input_tokens,
    target_lang: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """`translate --stream`: translate each group of lines as it arrives on `fd`, write and flush it.

    Same output, line for line, as translating the whole input at once; a bad line stops the run after
    the lines before it were written (they cannot be held back without holding the stream).
    """
    prefix = target_prefix(tokenizer, target_lang)
    first = 1
    for group in read_line_groups(fd):
        lines = read_lines(b"\n".join(group) + b"\n", "stdin", first_line=first)
        sources = encode_sources(lines, tokenizer, max_input_tokens=max_input_tokens, prefix=prefix,
                                 warn=warn, first_line=first)  # fmt: skip
        results = translate_sources(model, sources, options, max_tokens=max_tokens,
                                    max_sentences=max_sentences, first_index=first - 1)  # fmt: skip
        text = format_output(results, tokenizer, output_format, options.experts, first_line=first)
        out.write(text.encode("utf-8"))
        out.flush()
        first += len(lines)
