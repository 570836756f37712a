"""The model files in the artifact store (the artifact root or object storage): whether
they are intact, reading them in chunks, and the child process that checks an uploaded model.

Reads and hashing run in threads: a checkpoint is hundreds of megabytes and the event
loop serves every other call meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import FailedPrecondition
from shared.storage import Storage, StorageError, UnsupportedUri, sha256_of

CHUNK_BYTES = 1024 * 1024
# The code this process runs (the verification child imports the same `trainer_worker`).
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# All the verification child inherits: no credentials (database URL, TLS keys, cloud
# keys), no proxy settings. Everything else it needs is set by `_child_env`.
_CHILD_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
# Kinds a model cannot be used without.
REQUIRED_KINDS = ("config", "checkpoint")


def _check(artifact: Mapping[str, Any], storage: Storage) -> str | None:
    """What is wrong with one artifact's object, or None."""
    kind, uri = artifact.get("kind", "?"), artifact.get("uri", "")
    try:
        store = storage.store_for(uri)
        size = store.size(uri)
        if size is None:
            return f"{kind} artifact {uri} is missing"
        if size != int(artifact.get("size_bytes", -1)):
            recorded = artifact.get("size_bytes")
            return f"{kind} artifact {uri} has {size} bytes, {recorded} were recorded"
        digest = sha256_of(store, uri).sha256
    except UnsupportedUri:
        return f"{kind} artifact {uri} is not in the artifact store"
    except StorageError as error:
        return f"{kind} artifact cannot be checked: {error}"
    if digest != str(artifact.get("sha256", "")).lower():
        return (
            f"{kind} artifact {uri} has sha256 {digest}, "
            f"{artifact.get('sha256') or 'none'} was recorded"
        )
    return None


async def verify_all(artifacts: Sequence[Mapping[str, Any]], storage: Storage) -> None:
    """Re-reads every artifact; FailedPrecondition naming each one that is missing or changed."""
    kinds = {a.get("kind") for a in artifacts}
    problems = [f"no {kind} artifact" for kind in REQUIRED_KINDS if kind not in kinds]
    results = await asyncio.gather(*(asyncio.to_thread(_check, a, storage) for a in artifacts))
    problems += [p for p in results if p]
    if problems:
        raise FailedPrecondition("; ".join(problems))


async def read_chunks(storage: Storage, uri: str, *, offset_limit: int) -> AsyncIterator[bytes]:
    """The first `offset_limit` bytes of the object, CHUNK_BYTES at a time; each read
    runs in a thread."""
    chunks = storage.chunks(uri, limit=offset_limit)
    try:
        while chunk := await asyncio.to_thread(next, chunks, b""):
            yield chunk
    finally:
        await asyncio.to_thread(chunks.close)


def remove(artifacts: Sequence[Mapping[str, Any]], storage: Storage) -> None:
    """Deletes the objects (and the local folders they leave empty) of a model whose row
    is gone; URIs outside the artifact store are left alone."""
    storage.delete([str(a.get("uri", "")) for a in artifacts if a.get("uri")])


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the verification child found: errors by file ("config", "checkpoint")."""

    errors: Mapping[str, str]
    num_classes: int | None = None
    parameter_count: int = 0


def _child_env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV}
    env |= {
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "PYTHONPATH": str(_PROJECT_ROOT),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # The check runs on the CPU; nothing in it needs a GPU or a thread per core.
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    return env


async def verify_model_files(config: Path, checkpoint: Path, *, timeout_s: float) -> Verdict:
    """Runs `trainer_worker.verify` in a child: torch and mmdet stay out of this process.
    The child gets a minimal environment (no secrets) and a fresh scratch directory as its
    working directory and home, removed when it ends."""
    config, checkpoint = await asyncio.to_thread(lambda: (config.resolve(), checkpoint.resolve()))
    with tempfile.TemporaryDirectory(prefix="raven-verify-") as scratch:
        return await _verify_in(Path(scratch), config, checkpoint, timeout_s)


async def _verify_in(scratch: Path, config: Path, checkpoint: Path, timeout_s: float) -> Verdict:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainer_worker.verify",
        str(config),
        str(checkpoint),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=scratch,
        env=_child_env(scratch),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return Verdict(errors={"checkpoint": f"could not be checked within {timeout_s:.0f} s"})
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
    except (IndexError, ValueError) as error:
        raise RuntimeError(
            f"model verification exited with {process.returncode}: "
            f"{stderr.decode(errors='replace')[-2000:]}"
        ) from error
    if not verdict.get("ok"):
        return Verdict(errors=dict(verdict.get("errors") or {"checkpoint": "refused"}))
    return Verdict(
        errors={},
        num_classes=verdict.get("num_classes"),
        parameter_count=int(verdict.get("parameter_count") or 0),
    )
