"""What the commands that run a model share: the short flag names, warnings on stderr, CPU threads."""

from __future__ import annotations

import sys

# `-m MODEL` and `--beam N` as every decoding command spelled them before the flags came from DecodeOptions
MODEL_ALIASES = {"-m": "--model", "--beam": "--beam_size"}


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, when asked for (torch is imported only then)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
