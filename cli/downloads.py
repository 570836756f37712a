"""Artifacts fetched with DownloadArtifact: written beside their final name, checked against
the sha256 and size the server announced, then moved into place."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from cli.client import Clients
from shared.proto.raven.training.v1 import common_pb2, trained_model_pb2

# A whole download may take this long (the server streams in chunks).
DOWNLOAD_TIMEOUT_S = 600.0


class DownloadMismatch(Exception):
    """The bytes received are not the artifact the server announced."""


def download(
    clients: Clients, parent: str, artifact: str, folder: Path
) -> tuple[common_pb2.Artifact, Path]:
    """Downloads `artifact` (a name or a kind) of `parent` into `folder`; returns what the
    server announced and the file written."""
    request = trained_model_pb2.DownloadArtifactRequest(parent=parent, artifact=artifact)
    announced: common_pb2.Artifact | None = None
    digest = hashlib.sha256()
    size = 0
    folder.mkdir(parents=True, exist_ok=True)
    partial: Path | None = None
    out: BinaryIO | None = None
    try:
        for part in clients.models.DownloadArtifact(request, timeout=DOWNLOAD_TIMEOUT_S):
            if part.WhichOneof("part") == "artifact":
                announced = part.artifact
                partial = folder / f".{_file_name(announced, artifact)}.partial"
                out = partial.open("wb")
                continue
            if out is None:
                raise DownloadMismatch("the server sent data before naming the artifact")
            out.write(part.chunk)
            digest.update(part.chunk)
            size += len(part.chunk)
        if announced is None or partial is None or out is None:
            raise DownloadMismatch("the server named no artifact")
        out.close()
        if size != announced.size_bytes or digest.hexdigest() != announced.sha256:
            raise DownloadMismatch(
                f"{announced.name or artifact}: received {size} bytes with sha256 "
                f"{digest.hexdigest()[:12]}…, expected {announced.size_bytes} bytes with "
                f"sha256 {announced.sha256[:12]}…"
            )
        target = folder / _file_name(announced, artifact)
        os.replace(partial, target)
        partial = None
        return announced, target
    finally:
        if out is not None and not out.closed:
            out.close()
        if partial is not None:
            partial.unlink(missing_ok=True)


def _file_name(announced: common_pb2.Artifact, asked: str) -> str:
    """The artifact's own name, else the last part of its URI; never a path."""
    name = announced.name or announced.uri.rsplit("/", 1)[-1] or asked
    return Path(name).name or "artifact"
