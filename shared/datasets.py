"""Dataset references: `s3://bucket/key.json`, `file:///abs/path.json`, an absolute path,
or a path relative to the artifact root. Shared by the service (checks at creation) and
the worker (reads the files)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from shared.limits import quote
from shared.storage import S3Uri, UnsupportedUri, parse_s3_uri

SUPPORTED_SCHEMES = ("file", "s3")


class DatasetUriError(ValueError):
    pass


def parse_dataset_uri(uri: str) -> Path | S3Uri:
    """The object or path a reference names; a path may be relative to the artifact root."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        location = _s3(uri)
        if not location.key or location.key.endswith("/"):
            raise DatasetUriError(
                f"{quote(uri)}: name the annotation file (s3://bucket/path/file.json)"
            )
        key = PurePosixPath(location.key)
        if ".." in key.parts:
            raise DatasetUriError(f"{quote(uri)}: '..' is not allowed in a dataset path")
        if key.suffix.lower() != ".json":
            raise DatasetUriError(f"{quote(uri)}: expected the COCO annotation file (.json)")
        return location
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path if parsed.scheme else uri))
        if parsed.scheme == "file" and (
            parsed.netloc not in ("", "localhost") or not path.is_absolute()
        ):
            raise DatasetUriError(f"{quote(uri)}: a file URI needs an absolute path (file:///...)")
        if ".." in path.parts:
            raise DatasetUriError(f"{quote(uri)}: '..' is not allowed in a dataset path")
        if path.suffix.lower() != ".json":
            raise DatasetUriError(f"{quote(uri)}: expected the COCO annotation file (.json)")
        return path
    raise _unsupported(uri, parsed.scheme)


def parse_image_root(uri: str) -> Path | S3Uri:
    """The folder (or S3 prefix) images are resolved against."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        location = _s3(uri)
        if ".." in PurePosixPath(location.key).parts:
            raise DatasetUriError(f"{quote(uri)}: '..' is not allowed in an image root")
        return location
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise DatasetUriError(f"{quote(uri)}: a file URI needs an absolute path (file:///...)")
        path = Path(unquote(parsed.path if parsed.scheme else uri))
        if ".." in path.parts:
            raise DatasetUriError(f"{quote(uri)}: '..' is not allowed in an image root")
        return path
    raise _unsupported(uri, parsed.scheme)


def resolve_dataset_uri(uri: str, artifact_root: Path) -> Path | S3Uri:
    location = parse_dataset_uri(uri)
    if isinstance(location, S3Uri) or location.is_absolute():
        return location
    return artifact_root / location


def _s3(uri: str) -> S3Uri:
    try:
        return parse_s3_uri(uri)
    except UnsupportedUri as error:
        raise DatasetUriError(str(error)) from None


def _unsupported(uri: str, scheme: str) -> DatasetUriError:
    return DatasetUriError(
        f"{quote(uri)}: scheme {quote(scheme)} is not supported; use one of "
        + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        + " or a path relative to the artifact root"
    )
