"""`nmt-moe score`: the model's log-probability of given translations (forced decoding), batched.

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

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nmt_moe.checkpoint import ModelLoadError, atomic_write, load_model
from nmt_moe.data.batching import pad_ids
from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, lang_token
from nmt_moe.decoding.search import eval_mode
from nmt_moe.decoding.translate import InputError, encode_sources, make_batches, read_lines, warn_stderr


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
    max_tokens: int = 4096,
    max_sentences: int = 256,
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
) -> tuple[list[list[int]], list[list[int]]]:
    """Model input ids per source (as `translate` builds them) and target ids per target line."""
    prefix = [tokenizer.token_id(lang_token(target_lang))] if target_lang else []
    sources = encode_sources(src_lines, tokenizer, max_input_tokens=max_input_tokens, prefix=prefix,
                             warn=warn_stderr)  # fmt: skip
    sources = [s or [*prefix, EOS_ID] for s in sources]  # an empty source is scored as EOS alone
    encoded = tokenizer.encode(tgt_lines)
    targets = [[] if line.isspace() else ids for line, ids in zip(tgt_lines, encoded, strict=True)]
    return sources, targets


def format_scores(per_token: Sequence[list[float]], per_token_output: bool) -> str:
    """One line per pair: the summed log-prob, or the per-token log-probs separated by spaces."""
    if per_token_output:
        return "".join(" ".join(f"{x:.6f}" for x in row) + "\n" for row in per_token)
    return "".join(f"{sum(row):.6f}\n" for row in per_token)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmt-moe score",
        description="Log-probability of each target line given its source line (one output line per pair).",
    )
    parser.add_argument("-m", "--model", type=Path, required=True, help="checkpoint or export dir")
    parser.add_argument("--src", type=Path, required=True, help="source text, UTF-8, one sentence per line")
    parser.add_argument("--tgt", type=Path, required=True, help="target text, one line per source line")
    parser.add_argument("-o", "--output", type=Path, help="output file, written atomically (default stdout)")
    parser.add_argument("--per-token", action="store_true", help="one log-prob per target token and EOS")
    parser.add_argument("--target-lang", help="prepend the <2xx> tag (models trained with target_lang_token)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch (default 4096)")
    parser.add_argument("--max-sentences", type=int, default=256, help="pairs per batch (default 256)")
    parser.add_argument("--max-input-tokens", type=int, default=1024, help="longer sources are truncated")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def score_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_tokens < 1 or args.max_sentences < 1 or args.max_input_tokens < 3:
        parser.error("--max-tokens and --max-sentences must be >= 1, --max-input-tokens >= 3")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        src_lines = read_lines(args.src.read_bytes(), str(args.src))
        tgt_lines = read_lines(args.tgt.read_bytes(), str(args.tgt))
        if len(src_lines) != len(tgt_lines):
            raise InputError(f"{args.src} has {len(src_lines)} lines but {args.tgt} has {len(tgt_lines)}")
        model, tokenizer = load_model(args.model, args.device)
        sources, targets = encode_pairs(
            tokenizer,
            src_lines,
            tgt_lines,
            max_input_tokens=args.max_input_tokens,
            target_lang=args.target_lang,
        )
        per_token = score_pairs(model, sources, targets, max_tokens=args.max_tokens,
                                max_sentences=args.max_sentences)  # fmt: skip
    except (InputError, ModelLoadError, OSError, KeyError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    text = format_scores(per_token, args.per_token)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with atomic_write(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0
