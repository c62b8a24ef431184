"""The one place where what goes wrong in a command becomes an exit code.

- bad flags or flag combinations (`UsageError`, jsonargparse's own errors): one line on stderr and
  `SystemExit(2)`, as argparse does, before anything is loaded;
- bad input found while working (unreadable text, a model file that does not load, an output path that
  cannot be written, a config that does not fit): one line on stderr and exit code 2, never a traceback.

`nmt-moe train` adds its own codes on top (cli/train.py): 1 for a checkpoint that could not be written,
3 for a run stopped by non-finite losses, 128 + signal for an interrupted run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import yaml

from nmt_moe.data.text_io import InputError
from nmt_moe.model_files import ModelLoadError

# FileNotFoundError, PermissionError and ConnectionError are OSErrors; PlanError is a ValueError
BAD_INPUT: tuple[type[BaseException], ...] = (InputError, ModelLoadError, OSError, ValueError, KeyError,
                                               yaml.YAMLError)  # fmt: skip


class UsageError(Exception):
    """Flags that cannot work together or a value out of range, found before any work starts."""


def error_line(prog: str, error: BaseException | str) -> str:
    """`prog: error: message` on one line, whatever line breaks the message had."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{prog}: error: {message}"


def usage_error(prog: str, error: BaseException | str) -> SystemExit:
    """Print the one-line error and return the SystemExit(2) to raise (argparse's convention)."""
    print(error_line(prog, error), file=sys.stderr)
    return SystemExit(2)


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run one command; usage errors raise SystemExit(2), bad input returns 2, each after one stderr line."""
    try:
        return int(command() or 0)
    except UsageError as error:
        raise usage_error(prog, error) from None
    except BAD_INPUT as error:
        print(error_line(prog, error), file=sys.stderr)
        return 2
