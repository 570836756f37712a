"""Dataset references: `file:///abs/path.json`, an absolute path, or a path
relative to the artifact root. Shared by the service (checks at creation) and
the worker (reads the files)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

SUPPORTED_SCHEMES = ("file",)


class DatasetUriError(ValueError):
    pass


def parse_dataset_uri(uri: str) -> Path:
    """The path a reference names, absolute or relative to the artifact root."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path if parsed.scheme else uri))
        if parsed.scheme == "file" and (
            parsed.netloc not in ("", "localhost") or not path.is_absolute()
        ):
            raise DatasetUriError(f"{uri!r}: a file URI needs an absolute path (file:///...)")
        if ".." in path.parts:
            raise DatasetUriError(f"{uri!r}: '..' is not allowed in a dataset path")
        if path.suffix.lower() != ".json":
            raise DatasetUriError(f"{uri!r}: expected the COCO annotation file (.json)")
        return path
    raise DatasetUriError(
        f"{uri!r}: scheme {parsed.scheme!r} is not supported; use one of "
        + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        + " or a path relative to the artifact root"
    )


def resolve_dataset_uri(uri: str, artifact_root: Path) -> Path:
    path = parse_dataset_uri(uri)
    return path if path.is_absolute() else artifact_root / path
