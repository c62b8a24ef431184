"""What the CLI tests check of a command's stderr."""

from __future__ import annotations


def one_line_error(err: str) -> str:
    """The error line of a CLI's stderr; fails when there is a traceback or several error lines."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]
