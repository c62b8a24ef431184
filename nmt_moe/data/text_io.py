"""Text in, model ids out: the line rules every command that reads user text shares.

`translate`, `score`, `evaluate`, `routing` and `serve` read and encode text through these functions, so a
line means the same everywhere: split on "\\n" only (a CRLF's "\\r" dropped), strict UTF-8 with the bad line
named, whitespace-only lines left empty, over-long lines truncated with a warning, one output line per
input line. No torch, no Lightning: `nmt-moe translate` starts fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from nmt_moe.data.tokenizer import EOS_ID, Tokenizer, lang_token


class InputError(Exception):
    """Input text that cannot be used as given (e.g. invalid UTF-8); the message names the line."""


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


def read_text_file(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, by the rules of `read_lines` (errors name the file and line)."""
    return read_lines(Path(path).read_bytes(), str(path))


def target_prefix(tokenizer: Tokenizer, target_lang: str | None) -> list[int]:
    """The `<2xx>` tag id to prepend for `target_lang` (none without one); KeyError if the model lacks it."""
    return [tokenizer.token_id(lang_token(target_lang))] if target_lang else []


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


def one_line(text: str) -> str:
    """Guard the one-line-per-input rule against a detokenised newline or carriage return."""
    return text.replace("\r", " ").replace("\n", " ")
