"""What the CLI tests check of a command's output."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path


def one_line_error(err: str) -> str:
    """The error line of a CLI's stderr; fails when there is a traceback or several error lines."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def print_config(*configs: Path) -> tuple[int, str]:
    """Exit code and output of `nmt-moe train fit --config ... --print_config` (parses, builds nothing)."""
    from nmt_moe.cli.train import main as train_main

    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            train_main([*args, "--print_config"])
        except SystemExit as exit_:
            return int(exit_.code or 0), out.getvalue()
    return 0, out.getvalue()
