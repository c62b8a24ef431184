"""`nmt-moe translate`: translate a file (or stdin) line by line, never losing or reordering a line.

Guarantees, in the order the work happens:
  1. all input bytes are read and every line decoded as UTF-8 first; a bad line stops the run with its
     line number before anything is written;
  2. lines are split on "\\n" only (a trailing "\\r" of CRLF files is dropped too); an empty line or one of
     only (Unicode) whitespace becomes an empty output line without reaching the model;
  3. a line longer than `--max-input-tokens` is truncated, with a warning naming its line number;
  4. sentences are sorted by length and batched by `--max-tokens` (padded source tokens per batch; beam
     search multiplies the decoder batch by the beam size), results are put back in input order;
  5. the output file is written to a temp file beside it and renamed into place when complete.

Text output has one line per input line (the best hypothesis). `--nbest N` > 1 needs `--output-format
jsonl`, whose lines carry the score, the token ids, the n-best list and optionally the experts each
target token was routed to.

Start-up matters here (users pay it per file): this module imports neither Lightning nor `datasets`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from nmt_moe.checkpoint import ModelLoadError, atomic_write
from nmt_moe.data.batching import pad_ids
from nmt_moe.data.tokenizer import EOS_ID, Tokenizer, lang_token
from nmt_moe.decoding.beam import Hypothesis, beam_search
from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.decoding.sampling import SamplingOptions, sample_decode
from nmt_moe.decoding.streaming import read_line_groups
from nmt_moe.model_files import check_output_path


class InputError(Exception):
    """Input text that cannot be translated as given (e.g. invalid UTF-8); the message names the line."""


@dataclass(frozen=True)
class DecodeOptions:
    """Search settings shared by `translate`, `evaluate -m` and the benchmark."""

    beam_size: int = 5
    nbest: int = 1
    alpha: float = 0.6
    beta: float = 0.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 0
    experts: bool = False
    bf16: bool = False  # search under bfloat16 autocast: faster where the hardware has bf16, scores in fp32
    sampling: SamplingOptions | None = None  # draw one sample per line instead of searching

    @property
    def is_greedy(self) -> bool:
        """One beam, no penalties, no n-best or routing: greedy search returns the same (tests prove it)."""
        plain = self.alpha == 0 and self.beta == 0 and self.nbest == 1 and not self.experts
        return self.beam_size == 1 and plain and self.sampling is None


# --- input -------------------------------------------------------------------------------------------------


def read_lines(data: bytes, source: str = "input", first_line: int = 1) -> list[str]:
    """Lines of `data` (split on b"\\n", trailing b"\\r" dropped), each decoded as strict UTF-8.

    A final line without a newline still counts; a file ending in a newline has no extra empty line.
    Errors name the line, counted from `first_line`.
    """
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    lines = []
    for number, line in enumerate(raw, start=first_line):
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InputError(
                f"{source}: line {number} is not valid UTF-8 (byte {line[error.start]:#04x} at byte offset "
                f"{error.start}); convert the file to UTF-8, e.g. with iconv"
            ) from error
    return lines


def encode_sources(
    lines: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_input_tokens: int,
    prefix: Sequence[int] = (),
    warn: Callable[[str], None] | None = None,
    first_line: int = 1,
) -> list[list[int]]:
    """Model input ids per line (prefix + pieces + EOS), or [] for a line with nothing to translate.

    Lines over `max_input_tokens` (EOS and prefix included) are truncated with a warning naming the line
    (numbered from `first_line`).
    """
    if max_input_tokens < len(prefix) + 2:
        raise ValueError(f"max_input_tokens must leave room for a token and EOS, got {max_input_tokens}")
    sources = []
    encoded = tokenizer.encode(list(lines))
    for number, (line, ids) in enumerate(zip(lines, encoded, strict=True), start=first_line):
        if not ids or line.isspace():  # Unicode whitespace only (U+0085, U+2028, ...): nothing to translate
            sources.append([])
            continue
        ids = [*prefix, *ids]
        if len(ids) + 1 > max_input_tokens:
            if warn is not None:
                warn(f"line {number}: {len(ids) + 1} tokens, truncated to the first {max_input_tokens}")
            ids = ids[: max_input_tokens - 1]
        sources.append([*ids, EOS_ID])
    return sources


def make_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int) -> list[list[int]]:
    """Indices of the non-empty sources, longest first, grouped so batch size * longest <= max_tokens."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        # the first index of a batch is its longest source
        if (
            current
            and len(current) < max_sentences
            and (len(current) + 1) * lengths[current[0]] <= max_tokens
        ):
            current.append(index)
        else:
            batches.append([index])
    return batches


# --- decoding ----------------------------------------------------------------------------------------------


def translate_sources(
    model: Any,
    sources: Sequence[list[int]],
    options: DecodeOptions,
    *,
    max_tokens: int = 4096,
    max_sentences: int = 256,
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


def one_line(text: str) -> str:
    """Guard the one-line-per-input rule against a detokenised newline or carriage return."""
    return text.replace("\r", " ").replace("\n", " ")


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
    max_tokens: int = 4096,
    max_sentences: int = 256,
    max_input_tokens: int = 1024,
    target_lang: str | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[list[Hypothesis]]:
    """Encode, batch, search: the library form of `nmt-moe translate` (n-best lists in input order)."""
    prefix = [tokenizer.token_id(lang_token(target_lang))] if target_lang else []
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
    max_tokens: int = 4096,
    max_sentences: int = 256,
    max_input_tokens: int = 1024,
    target_lang: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """`translate --stream`: translate each group of lines as it arrives on `fd`, write and flush it.

    Same output, line for line, as translating the whole input at once; a bad line stops the run after
    the lines before it were written (they cannot be held back without holding the stream).
    """
    prefix = [tokenizer.token_id(lang_token(target_lang))] if target_lang else []
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


# --- command line ------------------------------------------------------------------------------------------


def add_decoding_arguments(parser: argparse.ArgumentParser, ensemble: bool = False) -> None:
    """Model and search options, shared with `nmt-moe evaluate -m` (ensemble: -m may repeat)."""
    group = parser.add_argument_group("model and search")
    if ensemble:
        help_ = "checkpoint (.ckpt) or `nmt-moe export` dir; repeat to ensemble models of one vocabulary"
        group.add_argument("-m", "--model", type=Path, action="append", help=help_)
    else:
        group.add_argument("-m", "--model", type=Path, help="training checkpoint (.ckpt) or export dir")
    group.add_argument("--beam", type=int, default=5, help="beam size; 1 = greedy (default 5)")
    group.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty alpha (default 0.6)")
    group.add_argument("--beta", type=float, default=0.0, help="GNMT coverage penalty beta (default 0)")
    group.add_argument("--max-len-a", type=float, default=1.5, help="max output = a * source length + b")
    group.add_argument("--max-len-b", type=int, default=10, help="see --max-len-a (default 10)")
    group.add_argument("--min-len", type=int, default=0, help="no EOS before this many tokens (default 0)")
    group.add_argument(
        "--max-tokens", type=int, default=4096, help="padded source tokens per batch (default 4096)"
    )
    group.add_argument("--max-sentences", type=int, default=256, help="sentences per batch (default 256)")
    group.add_argument(
        "--max-input-tokens",
        type=int,
        default=1024,
        help="longer inputs are truncated with a warning (default 1024)",
    )
    group.add_argument("--target-lang", help="prepend the <2xx> tag (models trained with target_lang_token)")
    group.add_argument(
        "--bf16",
        action="store_true",
        help="search under bfloat16 autocast: ~1.4x faster on CPUs with avx512_bf16/AMX and on recent GPUs; "
        "scores stay float32 (slower where bf16 is emulated)",
    )
    group.add_argument("--device", default="cpu", help="torch device (default cpu)")
    group.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def decode_options(args: argparse.Namespace, nbest: int = 1, experts: bool = False) -> DecodeOptions:
    sampling = None
    if getattr(args, "sampling", False):
        sampling = SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)
    return DecodeOptions(
        beam_size=args.beam,
        nbest=nbest,
        alpha=args.alpha,
        beta=args.beta,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        min_len=args.min_len,
        experts=experts,
        bf16=args.bf16,
        sampling=sampling,
    )


def check_decoding_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad option values up front (argparse exits with code 2 and names the option)."""
    if args.beam < 1:
        parser.error(f"--beam must be >= 1, got {args.beam}")
    if args.alpha < 0 or args.beta < 0:
        parser.error("--alpha and --beta must be >= 0")
    if args.min_len < 0:
        parser.error("--min-len must be >= 0")
    for name in ("max_tokens", "max_sentences"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_input_tokens < 3:
        parser.error("--max-input-tokens must be >= 3")


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _translate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmt-moe translate",
        description="Translate text, one output line per input line (stdin to stdout by default).",
    )
    parser.add_argument("-i", "--input", type=Path, help="input text file, UTF-8 (default stdin)")
    parser.add_argument("-o", "--output", type=Path, help="output file, written atomically (default stdout)")
    parser.add_argument("--output-format", choices=("text", "jsonl"), default="text")
    parser.add_argument("--nbest", type=int, default=1, help="hypotheses per line (> 1 needs jsonl)")
    parser.add_argument("--experts", action="store_true", help="jsonl: experts each target token used")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="translate stdin as it arrives, writing and flushing each line (or group of lines that "
        "arrived together) at once: for pipes and interactive use; stdout only",
    )
    add_decoding_arguments(parser, ensemble=True)
    parser.add_argument(
        "--int8",
        action="store_true",
        help="CPU only: dynamic int8 weights for LSTM, Linear and expert layers (torch.ao); scores stay "
        "float32. Faster on AVX2 CPUs, most with VNNI (speed and BLEU: docs/RESULTS.md)",
    )
    group = parser.add_argument_group("sampling (e.g. for back-translation)")
    group.add_argument("--sampling", action="store_true", help="draw one translation per line (no beam)")
    group.add_argument("--temperature", type=float, default=1.0, help="< 1 sharpens, > 1 flattens (1)")
    group.add_argument("--top-k", type=int, default=0, help="draw from the K most likely tokens (0: all)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set of mass P (1: all)")
    group.add_argument("--seed", type=int, default=0, help="same seed, same samples, whatever the batching")
    return parser


def _check_translate_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values and combinations before anything is loaded (argparse: one line, exit 2)."""
    if not args.model:
        parser.error("-m/--model is required")
    check_decoding_arguments(parser, args)
    if not 1 <= args.nbest <= args.beam:
        parser.error(f"--nbest must be between 1 and --beam ({args.beam}), got {args.nbest}")
    if args.int8 and (args.bf16 or args.device != "cpu"):
        parser.error("--int8 runs on the CPU in float32 around int8 GEMMs: drop --bf16 and use --device cpu")
    if args.output_format == "text" and (args.nbest > 1 or args.experts):
        parser.error("--nbest > 1 and --experts need --output-format jsonl (text keeps one line per input)")
    if args.stream and (args.input is not None or args.output is not None):
        parser.error("--stream reads stdin and writes stdout: drop -i/-o")
    if args.sampling:
        if args.nbest > 1 or args.experts:
            parser.error("--sampling draws one translation per line: drop --nbest and --experts")
        try:
            SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)
        except ValueError as error:
            parser.error(f"--{str(error).replace('_', '-')}")


def _load_for_translation(args: argparse.Namespace) -> tuple[Any, Tokenizer]:
    """The model (an ensemble for several -m), int8-quantised if asked, and its tokenizer."""
    from nmt_moe.decoding.ensemble import load_models, members

    model, tokenizer = load_models(args.model, args.device)
    if args.int8:
        from nmt_moe.decoding.int8 import quantize_int8  # torch.ao loads only when asked for

        for member in members(model):
            quantize_int8(member)
    return model, tokenizer


def translate_main(argv: list[str]) -> int:
    parser = _translate_parser()
    args = parser.parse_args(argv)
    _check_translate_arguments(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = decode_options(args, args.nbest, args.experts)
    batching = dict(max_tokens=args.max_tokens, max_sentences=args.max_sentences,
                    max_input_tokens=args.max_input_tokens, target_lang=args.target_lang)  # fmt: skip
    prog = parser.prog
    try:
        if args.stream:
            model, tokenizer = _load_for_translation(args)
            stream_translate(model, tokenizer, sys.stdin.fileno(), sys.stdout.buffer, options,
                             output_format=args.output_format, warn=warn_stderr, **batching)  # fmt: skip
            return 0
        if args.output is not None:
            check_output_path(args.output)  # before the work, not after it
        data = args.input.read_bytes() if args.input else sys.stdin.buffer.read()
        lines = read_lines(data, str(args.input or "stdin"))
        model, tokenizer = _load_for_translation(args)
        results = translate_lines(model, tokenizer, lines, options, warn=warn_stderr,
                                  progress=args.input is not None and not args.quiet, **batching)  # fmt: skip
    except (InputError, ModelLoadError, OSError, KeyError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    text = format_output(results, tokenizer, args.output_format, args.experts)
    if args.output is None:
        sys.stdout.buffer.write(text.encode("utf-8"))  # UTF-8 whatever the locale says
        sys.stdout.flush()
    else:
        try:
            with atomic_write(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as error:  # e.g. the disk filled up; the previous file, if any, is left as it was
            print(f"{prog}: error: {args.output}: cannot write ({error.strerror})", file=sys.stderr)
            return 2
    return 0
