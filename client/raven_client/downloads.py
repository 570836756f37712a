"""Writing a download stream to a file, checked against the size and sha256 that the
stream's first message announces."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from raven_client._proto.raven.training.v1 import common_pb2, trained_model_pb2
from raven_client.errors import ChecksumMismatch


def write(
    responses: Iterable[trained_model_pb2.DownloadTrainedModelResponse], path: Path
) -> common_pb2.Artifact:
    """Streams `responses` into a file beside `path`, renamed to `path` once its size and
    sha256 match the artifact the first message describes; raises ChecksumMismatch when
    they do not, `path` left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    artifact: common_pb2.Artifact | None = None
    digest = hashlib.sha256()
    size = 0
    try:
        with partial.open("wb") as out:
            for response in responses:
                if response.WhichOneof("part") == "artifact":
                    artifact = response.artifact
                    continue
                digest.update(response.chunk)
                size += len(response.chunk)
                out.write(response.chunk)
            out.flush()
            os.fsync(out.fileno())
        if artifact is None:
            raise ChecksumMismatch("the download announced no artifact")
        if size != artifact.size_bytes or digest.hexdigest() != artifact.sha256.lower():
            raise ChecksumMismatch(
                f"{artifact.name or artifact.kind}: got {size} bytes with sha256 "
                f"{digest.hexdigest()}, expected {artifact.size_bytes} with {artifact.sha256}"
            )
        os.replace(partial, path)
        return artifact
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
