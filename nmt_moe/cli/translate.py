"""`nmt-moe translate`: translate a file (or stdin) line by line, never losing or reordering a line.

All input is read and every line decoded as UTF-8 before anything is written (a bad line stops the run
with its line number); the output file is written to a temp file beside it and renamed into place when
complete. The library work is `nmt_moe.decoding.translate`; this module only reads flags and files.

Start-up matters here (users pay it per file): nothing here imports Lightning or `datasets`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Literal

from nmt_moe.checkpoint import atomic_write
from nmt_moe.cli.common import MODEL_ALIASES, set_threads, warn_stderr
from nmt_moe.cli.errors import UsageError, run_command
from nmt_moe.cli.parsing import Command, parse
from nmt_moe.data.text_io import read_lines
from nmt_moe.data.tokenizer import Tokenizer
from nmt_moe.decoding.options import BatchOptions, DecodeOptions, SamplingOptions
from nmt_moe.decoding.translate import format_output, stream_translate, translate_lines
from nmt_moe.model_files import check_output_path


def load_for_translation(paths: list[Path], device: str, int8: bool = False) -> tuple[Any, Tokenizer]:
    """The model (an ensemble for several paths), int8-quantised if asked, and its tokenizer."""
    from nmt_moe.decoding.ensemble import load_models, members

    model, tokenizer = load_models(paths, device)
    if int8:
        from nmt_moe.decoding.int8 import quantize_int8  # torch.ao loads only when asked for

        for member in members(model):
            quantize_int8(member)
    return model, tokenizer


def translate(
    model: list[Path],
    input: Path | None = None,
    output: Path | None = None,
    output_format: Literal["text", "jsonl"] = "text",
    quiet: bool = False,
    stream: bool = False,
    int8: bool = False,
    target_lang: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    sampling: bool = False,
    options: DecodeOptions = DecodeOptions(),  # noqa: B008 (frozen)
    batching: BatchOptions = BatchOptions(),  # noqa: B008 (frozen)
    sampling_options: SamplingOptions = SamplingOptions(),  # noqa: B008 (frozen)
) -> int:
    """Translate text, one output line per input line (stdin to stdout by default).

    Args:
        model: training checkpoint (.ckpt) or `nmt-moe export` dir; repeat to ensemble models of one
            vocabulary
        input: input text file, UTF-8 (default stdin)
        output: output file, written atomically (default stdout)
        output_format: text (the best hypothesis) or jsonl (score, tokens, n-best list, experts)
        quiet: no progress bar
        stream: translate stdin as it arrives, writing and flushing each line (or group of lines that
            arrived together) at once: for pipes and interactive use; stdout only
        int8: CPU only: dynamic int8 weights for LSTM, Linear and expert layers (torch.ao); scores stay
            float32. Faster on AVX2 CPUs, most with VNNI (speed and BLEU: docs/RESULTS.md)
        target_lang: prepend the <2xx> tag (models trained with target_lang_token)
        device: torch device
        threads: torch CPU threads (default: torch's choice)
        sampling: draw one translation per line (no beam), e.g. for back-translation
        options: search settings
        batching: batching settings
        sampling_options: settings of --sampling
    """
    check_translate_flags(options, output_format, stream, input, output, int8, device, sampling)
    if sampling:
        options = dataclasses.replace(options, sampling=sampling_options)
    set_threads(threads)
    batch = dict(max_tokens=batching.max_tokens, max_sentences=batching.max_sentences,
                 max_input_tokens=batching.max_input_tokens, target_lang=target_lang)  # fmt: skip
    if stream:
        loaded, tokenizer = load_for_translation(model, device, int8)
        stream_translate(loaded, tokenizer, sys.stdin.fileno(), sys.stdout.buffer, options,
                         output_format=output_format, warn=warn_stderr, **batch)  # fmt: skip
        return 0
    if output is not None:
        check_output_path(output)  # before the work, not after it
    data = input.read_bytes() if input else sys.stdin.buffer.read()
    lines = read_lines(data, str(input or "stdin"))
    loaded, tokenizer = load_for_translation(model, device, int8)
    results = translate_lines(loaded, tokenizer, lines, options, warn=warn_stderr,
                              progress=input is not None and not quiet, **batch)  # fmt: skip
    text = format_output(results, tokenizer, output_format, options.experts)
    if output is None:
        sys.stdout.buffer.write(text.encode("utf-8"))  # UTF-8 whatever the locale says
        sys.stdout.flush()
        return 0
    try:
        with atomic_write(output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:  # e.g. the disk filled up; the previous file, if any, is left as it was
        raise OSError(f"{output}: cannot write ({error.strerror})") from error
    return 0


def check_translate_flags(
    options: DecodeOptions, output_format: str, stream: bool, input: Path | None, output: Path | None,
    int8: bool, device: str, sampling: bool,
) -> None:  # fmt: skip
    """Reject combinations that cannot work before anything is loaded."""
    if options.nbest > options.beam_size:
        raise UsageError(f"--nbest must be between 1 and --beam ({options.beam_size}), got {options.nbest}")
    if int8 and (options.bf16 or device != "cpu"):
        raise UsageError(
            "--int8 runs on the CPU in float32 around int8 GEMMs: drop --bf16 and use --device cpu"
        )
    if output_format == "text" and (options.nbest > 1 or options.experts):
        raise UsageError(
            "--nbest > 1 and --experts need --output-format jsonl (text keeps one line per input)"
        )
    if stream and (input is not None or output is not None):
        raise UsageError("--stream reads stdin and writes stdout: drop -i/-o")
    if sampling and (options.nbest > 1 or options.experts):
        raise UsageError("--sampling draws one translation per line: drop --nbest and --experts")


COMMAND = Command(
    prog="nmt-moe translate",
    function=translate,
    flat={"options": DecodeOptions, "batching": BatchOptions, "sampling_options": SamplingOptions},
    skip=frozenset({"sampling"}),
    aliases={**MODEL_ALIASES, "-i": "--input", "-o": "--output"},
)


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: translate(**parse(COMMAND, argv)))
