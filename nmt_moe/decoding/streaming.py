"""Input for `nmt-moe translate --stream`: complete lines as soon as they arrive on a file descriptor.

`os.read` returns whatever the pipe holds (at least one byte, blocking only when it is empty), so a
writer that sends one line and waits for its translation gets it at once, while a fast writer's lines
arrive in groups that are translated as one batch. A line is only handed on once its newline has arrived
(or at end of input), so no line is ever split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator


def read_line_groups(fd: int, chunk_bytes: int = 1 << 16) -> Iterator[list[bytes]]:
    """Groups of complete lines (without their b"\\n") in arrival order; a final unterminated line last."""
    pending = b""
    while True:
        data = os.read(fd, chunk_bytes)
        if not data:
            if pending:
                yield [pending]
            return
        *complete, pending = (pending + data).split(b"\n")
        if complete:
            yield complete
