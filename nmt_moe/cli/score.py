"""`nmt-moe score`: the model's log-probability of given translations, one output line per line pair
(the library work is `nmt_moe.scoring`)."""

from __future__ import annotations

import sys
from pathlib import Path

from nmt_moe.cli.common import set_threads, warn_stderr
from nmt_moe.cli.errors import run_command
from nmt_moe.cli.parsing import Command, parse
from nmt_moe.data.text_io import InputError, read_text_file
from nmt_moe.decoding.options import BatchOptions


def score(
    model: Path,
    src: Path,
    tgt: Path,
    output: Path | None = None,
    per_token: bool = False,
    target_lang: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    batching: BatchOptions = BatchOptions(),  # noqa: B008 (frozen)
) -> int:
    """Log-probability of each target line given its source line (one output line per pair).

    Args:
        model: training checkpoint (.ckpt) or export dir
        src: source text, UTF-8, one sentence per line
        tgt: target text, one line per source line
        output: output file, written atomically (default stdout)
        per_token: one log-prob per target token and EOS instead of their sum
        target_lang: prepend the <2xx> tag (models trained with target_lang_token)
        device: torch device
        threads: torch CPU threads (default: torch's choice)
        batching: batching settings (pairs sorted by length, output in input order)
    """
    from nmt_moe.checkpoint import atomic_write, load_model
    from nmt_moe.scoring import encode_pairs, format_scores, score_pairs

    set_threads(threads)
    src_lines, tgt_lines = read_text_file(src), read_text_file(tgt)
    if len(src_lines) != len(tgt_lines):
        raise InputError(f"{src} has {len(src_lines)} lines but {tgt} has {len(tgt_lines)}")
    loaded, tokenizer = load_model(model, device)
    sources, targets = encode_pairs(
        tokenizer, src_lines, tgt_lines, max_input_tokens=batching.max_input_tokens, target_lang=target_lang,
        warn=warn_stderr,
    )  # fmt: skip
    per_pair = score_pairs(loaded, sources, targets, max_tokens=batching.max_tokens,
                           max_sentences=batching.max_sentences)  # fmt: skip
    text = format_scores(per_pair, per_token)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with atomic_write(output, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


COMMAND = Command(prog="nmt-moe score", function=score, flat={"batching": BatchOptions},
                  aliases={"-m": "--model", "-o": "--output"})  # fmt: skip


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: score(**parse(COMMAND, argv)))
