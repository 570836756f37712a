"""A run that cannot write under the artifact root: the disk is full, or it is read-only.

Neither is a training crash: the run fails with a reason of its own and a message
that says what to do, and the worker goes on serving. The cause is found in the
error raised where the worker writes, or, for a training child that died, by
writing a probe file where it wrote and in the end of its log.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from pathlib import Path

DISK_FULL = "disk_full"
UNWRITABLE = "artifact_store_unwritable"

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# What a child's log says when a write failed on a read-only file system. A full disk is
# found by the probe alone: "No space left on device" also comes from a full /dev/shm.
_READ_ONLY_SIGN = re.compile(r"\[Errno 30\]|Read-only file system")
# Enough to fail on a disk that a checkpoint filled; small enough to cost nothing.
_PROBE_BYTES = 1 << 20
_CHAIN_LIMIT = 8

_MESSAGES = {
    DISK_FULL: (
        "the worker's disk under its artifact root (RAVEN_ARTIFACT_ROOT) is full: free space "
        "there (a run needs room for its checkpoints and its model) and retry the run"
    ),
    UNWRITABLE: (
        "the worker cannot write under its artifact root (RAVEN_ARTIFACT_ROOT): {cause}; "
        "make it writable for the worker and retry the run"
    ),
}


def message(reason: str, cause: str) -> str:
    """What a person reads: the cause and what to do, without the machine's paths."""
    return _MESSAGES[reason].format(cause=cause)


def fault_of(error: BaseException, *, within: Path | None = None) -> tuple[str, str] | None:
    """(reason, cause) when `error`, or what caused it, is a write that failed for lack of
    space or of permission; None for any other error. With `within`, a permission error
    counts only for a file under it (reading someone else's file is another matter)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < _CHAIN_LIMIT:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            if current.errno in _FULL:
                return DISK_FULL, "no space left"
            if current.errno == errno.EROFS:
                return UNWRITABLE, "it is read-only"
            if current.errno in _UNWRITABLE and _under(current.filename, within):
                return UNWRITABLE, "permission denied"
        current = current.__cause__ or current.__context__
    return None


def _under(filename: object, within: Path | None) -> bool:
    if within is None:
        return True
    if not isinstance(filename, (str, os.PathLike)):
        return False
    return Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(within))


def probe(directory: Path) -> tuple[str, str] | None:
    """Writes and removes a probe file in `directory` (or the nearest folder above it that
    exists): the fault that stops it, or None when it can be written."""
    target = directory
    while not target.exists() and target != target.parent:
        target = target.parent
    path = target / f".raven-probe-{uuid.uuid4().hex}"
    try:
        with path.open("wb") as file:
            file.write(b"\0" * _PROBE_BYTES)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        return fault_of(error)
    finally:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def in_log(tail: str) -> tuple[str, str] | None:
    """The fault the end of a training log names, if any."""
    if _READ_ONLY_SIGN.search(tail):
        return UNWRITABLE, "it is read-only"
    return None


def diagnose(directory: Path, log_tail: str) -> tuple[str, str] | None:
    """Why a training child that wrote into `directory` died, when it is one of these."""
    return probe(directory) or in_log(log_tail)
