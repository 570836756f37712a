"""Datasets and checkpoints in object storage, fetched to local files before training.

A dataset on S3 is its annotation file plus the images it lists (only those), downloaded
in parallel into the attempt's folder; `prepare_dataset` then reads them as local files.
A checkpoint is downloaded and used only if its bytes hash to the sha256 the system
recorded: the training child unpickles checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from shared.storage import (
    ObjectNotFound,
    S3Uri,
    Storage,
    StorageError,
    UnsupportedUri,
    get_files,
    parse_s3_uri,
)
from trainer_worker.dataset import DatasetError, resolve_location

_EXAMPLES = 3
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CorruptObject(Exception):
    """An object whose bytes are not the ones the system recorded."""


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme == "s3"


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalDataset:
    """Where the annotation file and the images are on this machine."""

    annotation_path: Path
    # None: next to the annotation file.
    image_root: Path | None


def fetch_dataset(
    *,
    dataset_uri: str,
    image_root: str,
    folder: Path,
    storage: Storage,
    artifact_root: Path,
) -> LocalDataset:
    """Downloads what of a dataset is in object storage into `folder`; local parts stay
    where they are. Images default to the annotation file's folder (or S3 prefix)."""
    # An S3 annotation file is read into memory first: a dataset refused for its names
    # leaves nothing behind.
    annotation: bytes | None = None
    if is_remote(dataset_uri):
        location = _s3(dataset_uri)
        annotation_path = folder / (PurePosixPath(location.key).name or "annotations.json")
        annotation = _read_annotation(storage, dataset_uri)
    else:
        annotation_path = resolve_location(dataset_uri, artifact_root=artifact_root)

    images_uri = image_root
    if not images_uri and is_remote(dataset_uri):
        images_uri = dataset_uri.rsplit("/", 1)[0] + "/"
    if not is_remote(images_uri):
        local_root = (
            resolve_location(image_root, artifact_root=artifact_root) if image_root else None
        )
        if annotation is not None:
            _write(annotation_path, annotation)
        return LocalDataset(annotation_path=annotation_path, image_root=local_root)

    prefix = _s3(images_uri)
    key_prefix = prefix.key if not prefix.key or prefix.key.endswith("/") else prefix.key + "/"
    names = _listed_images(annotation if annotation is not None else _bytes(annotation_path))
    unsafe = [n for n in names if not _is_relative(n)]
    if unsafe:
        raise DatasetError(
            "dataset_invalid",
            f"{len(unsafe)} images have a file_name that is not a relative path under "
            f"{images_uri} ({_sample(unsafe)}): S3 images are named relative to image_root",
        )
    if annotation is not None:
        _write(annotation_path, annotation)
    local_root = folder / "images"
    transfers = [
        (str(S3Uri(prefix.bucket, key_prefix + name)), local_root / name) for name in names
    ]
    try:
        missing = get_files(storage.s3, transfers)
    except StorageError as error:
        raise DatasetError(
            "dataset_unreadable", f"cannot download the images under {images_uri}: {error}"
        ) from None
    if missing:
        shown = [uri.removeprefix(f"s3://{prefix.bucket}/{key_prefix}") for uri in missing]
        raise DatasetError(
            "dataset_invalid",
            f"{len(missing)} images are missing under {images_uri} ({_sample(shown)}): "
            "upload them there or set image_root",
        )
    return LocalDataset(annotation_path=annotation_path, image_root=local_root)


def fetch_verified(storage: Storage, uri: str, *, sha256: str, folder: Path) -> Path:
    """A local copy of the object at `uri` in `folder`, only once its bytes hash to `sha256`.
    StorageError when it cannot be read (ObjectNotFound when it does not exist)."""
    expected = sha256.lower()
    if not _SHA256.fullmatch(expected):
        raise CorruptObject(f"{uri}: the system recorded no valid sha256 ({sha256 or 'none'})")
    name = PurePosixPath(_object_key(uri)).name or "object"
    target = folder / expected / name
    staging = target.with_name(f".{name}.{uuid.uuid4().hex}.download")
    try:
        stored = storage.get_file(uri, staging)
        if stored.sha256 != expected:
            raise CorruptObject(f"{uri} has sha256 {stored.sha256}, the system recorded {expected}")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def _read_annotation(storage: Storage, uri: str) -> bytes:
    try:
        return b"".join(storage.s3.chunks(uri))
    except ObjectNotFound:
        raise DatasetError("dataset_unreadable", f"annotation file {uri} does not exist") from None
    except StorageError as error:
        raise DatasetError(
            "dataset_unreadable", f"cannot read annotation file {uri}: {error}"
        ) from None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _listed_images(annotation: bytes) -> list[str]:
    """The distinct image file names an annotation file lists. A file that is not COCO
    lists none: `prepare_dataset` says what is wrong with it."""
    try:
        document: Any = json.loads(annotation)
    except (UnicodeDecodeError, ValueError):
        return []
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        return []
    names = (i.get("file_name") for i in images if isinstance(i, dict))
    return sorted({n for n in names if isinstance(n, str) and n})


def _is_relative(name: str) -> bool:
    """A key below the prefix: no absolute name, no '..', nothing that names the prefix
    itself."""
    path = PurePosixPath(name)
    return (
        "\0" not in name and not path.is_absolute() and ".." not in path.parts and bool(path.parts)
    )


def _s3(uri: str) -> S3Uri:
    try:
        return parse_s3_uri(uri)
    except UnsupportedUri as error:
        raise DatasetError("dataset_unreadable", str(error)) from None


def _object_key(uri: str) -> str:
    return parse_s3_uri(uri).key if is_remote(uri) else urlparse(uri).path


def _sample(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")
