"""Replacing files and directories so that a crash at any instant leaves the old one or the new one, and
giving what we write the permissions the user's umask asks for.

`tempfile.mkstemp` / `mkdtemp` create 0600 files and 0700 directories whatever the umask; renamed into
place, they would keep those modes (a checkpoint a group could not read). `umask_mode` gives the mode an
ordinary `open` / `mkdir` would have given them.

A directory (an export bundle) cannot be replaced by one `rename` while the old one exists: rename refuses a
non-empty target. Linux swaps two paths atomically (`renameat2` with RENAME_EXCHANGE); the old bundle then
sits at the staging path and is deleted. Where the swap is not available (another OS, a filesystem without
it), the old directory is moved aside first, so a crash between the two renames leaves it at
`.<name>.old`, never deleted before the new one is in place.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # linux/fs.h


def umask_mode(directory: bool = False) -> int:
    """0o666 (files) or 0o777 (directories) less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # not supported here: fall back
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_path(staging: Path, target: Path) -> None:
    """Put the complete file or directory `staging` at `target`, replacing what is there (a file or a
    directory), in one atomic rename where the system can swap paths; elsewhere the old one is moved aside
    first.

    Both must be on one filesystem (create `staging` beside `target`). `staging` is gone afterwards.
    """
    if not target.exists() or (target.is_file() and staging.is_file()):  # os.replace is atomic here
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        _remove(staging)  # the old directory or file, now at the staging path
        return
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        _remove(old)
    os.replace(target, old)
    os.replace(staging, target)
    _remove(old)
