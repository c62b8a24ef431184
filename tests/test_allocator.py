"""keep_freed_memory: freed tensors are reused instead of coming back as fresh, page-faulting memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nmt_moe.allocator import keep_freed_memory

# Allocates and frees the same large tensors (16 and 40 MB: below and above glibc's dynamic mmap threshold)
# round after round and prints the minor page faults of the last five rounds. The first rounds grow the heap
# (a freed 40 MB block is split for the next 16 MB one until free blocks have coalesced), as the first steps
# of a training run do. Runs in a fresh interpreter because the allocator settings are process-wide and
# only apply to memory allocated after them.
PROGRAM = """
import resource, sys
import torch
from nmt_moe.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def round_():
    for megabytes in (16, 40):
        torch.empty(megabytes * 2**18).fill_(1.0)
for _ in range(10):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return int(result.stdout.split()[-1])


def test_freed_tensors_are_reused_without_page_faults() -> None:
    if not keep_freed_memory():  # the pytest process itself: harmless, and tells whether this is glibc
        pytest.skip("not glibc malloc: nothing to tune")
    default, kept = _page_faults("default"), _page_faults("keep")
    # 5 rounds x 56 MB of fresh pages is ~72,000 faults of 4 KB under glibc's defaults
    assert default > 20_000, default
    assert kept < default / 10, (kept, default)


def test_nmt_moe_commands_run_with_it() -> None:
    """The `nmt-moe` entry point applies the setting before it imports the command's module."""
    code = (
        "import nmt_moe.cli, nmt_moe.allocator as a\n"
        "try:\n    nmt_moe.cli.main(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('calls', a.keep_freed_memory.cache_info().misses)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["calls", "1"], result.stdout[-500:]
