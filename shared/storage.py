"""Where datasets and artifacts live: one small interface, two backends.

`LocalStore` serves file:// URIs (and paths relative to it) inside the artifact root
and refuses anything outside. `S3Store` serves `s3://bucket/key` on AWS or any
S3-compatible server (MinIO, moto); credentials come from the standard AWS chain
(environment, config files, instance roles). `Storage` picks the backend by a URI's
scheme and knows where new artifacts go (`RAVEN_ARTIFACT_STORE`).

Every method blocks: async callers run them with `asyncio.to_thread`. boto3 is
imported on first use, so a process that never touches S3 never loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from shared.limits import quote
from shared.settings import Settings

CHUNK_BYTES = 1024 * 1024
# Parallel transfers of many small objects (dataset images).
TRANSFER_THREADS = 16
_DELETE_BATCH = 1000


class StorageError(Exception):
    """An object that cannot be read, written or deleted; the message names its URI."""


class ObjectNotFound(StorageError):
    pass


class UnsupportedUri(StorageError):
    """A URI no backend serves: an unknown scheme, or a path outside the artifact root."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    uri: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Uri:
    """`s3://bucket/key` (the key may be empty: the bucket, or a prefix ending in '/')."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UnsupportedUri(f"{quote(uri)} is not an s3://bucket/key URI")
    if parsed.query or parsed.fragment:
        raise UnsupportedUri(f"{quote(uri)}: an S3 URI has no query or fragment")
    return S3Uri(bucket=parsed.netloc, key=unquote(parsed.path).lstrip("/"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectStore(Protocol):
    def put_file(self, source: Path, uri: str) -> StoredObject:
        """Stores a local file at `uri`; its size and sha256."""
        ...

    def get_file(self, uri: str, target: Path) -> StoredObject:
        """Streams the object into `target` (replaced whole, never half-written);
        the size and sha256 of what was written. ObjectNotFound when it is missing."""
        ...

    def size(self, uri: str) -> int | None:
        """The object's size, None when it does not exist."""
        ...

    def chunks(self, uri: str, *, limit: int | None = None) -> Generator[bytes, None, None]:
        """The object's first `limit` bytes (all without one), CHUNK_BYTES at a time."""
        ...

    def delete(self, uris: Sequence[str]) -> None:
        """Deletes the objects; missing ones are no error."""
        ...

    def delete_prefix(self, uri: str) -> None:
        """Deletes every object under a folder-like URI."""
        ...


class LocalStore:
    """Files inside one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def path_of(self, uri: str) -> Path:
        """The path of a file:// URI or a root-relative path; UnsupportedUri outside the root."""
        parsed = urlparse(uri)
        if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
            path = Path(unquote(parsed.path))
        elif not parsed.scheme and uri:
            path = self.root / uri
        else:
            raise UnsupportedUri(f"{quote(uri)} is not a local file URI")
        path = path.resolve()
        if not path.is_relative_to(self.root):
            raise UnsupportedUri(f"{quote(uri)} is not in the artifact store")
        return path

    def put_file(self, source: Path, uri: str) -> StoredObject:
        target = self.path_of(uri)
        if source.resolve() == target:
            return StoredObject(target.as_uri(), target.stat().st_size, sha256_file(target))
        with source.open("rb") as file:
            size, digest = _write_atomically(target, iter(lambda: file.read(CHUNK_BYTES), b""))
        return StoredObject(target.as_uri(), size, digest)

    def get_file(self, uri: str, target: Path) -> StoredObject:
        path = self.path_of(uri)
        try:
            file = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # A folder is no object, as on S3.
            raise ObjectNotFound(f"{uri} does not exist") from None
        except OSError as error:
            raise StorageError(f"cannot read {uri}: {error.strerror}") from None
        with file:
            size, digest = _write_atomically(target, iter(lambda: file.read(CHUNK_BYTES), b""))
        return StoredObject(uri, size, digest)

    def size(self, uri: str) -> int | None:
        path = self.path_of(uri)
        return path.stat().st_size if path.is_file() else None

    def chunks(self, uri: str, *, limit: int | None = None) -> Generator[bytes, None, None]:
        path = self.path_of(uri)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{uri} does not exist") from None
        with file:
            left = limit
            while left is None or left > 0:
                chunk = file.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def delete(self, uris: Sequence[str]) -> None:
        """Also removes the folders the files leave empty (never the root)."""
        folders = set()
        for uri in uris:
            path = self.path_of(uri)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in folders:
            if folder != self.root:
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def delete_prefix(self, uri: str) -> None:
        path = self.path_of(uri)
        if path == self.root:
            raise UnsupportedUri(f"{uri}: refusing to delete the whole artifact store")
        shutil.rmtree(path, ignore_errors=True)


@dataclass(slots=True)
class S3Store:
    """Objects on S3 or an S3-compatible server. The client is made on first use and
    shared by threads (boto3 clients are thread-safe; sessions are not)."""

    endpoint_url: str = ""
    region: str = ""
    _client: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.endpoint_url or None,
                    region_name=self.region or None,
                    config=Config(
                        max_pool_connections=TRANSFER_THREADS * 2,
                        connect_timeout=5,
                        read_timeout=60,
                        retries={"max_attempts": 3, "mode": "standard"},
                    ),
                )
            return self._client

    def put_file(self, source: Path, uri: str) -> StoredObject:
        location = _object(uri)
        digest = sha256_file(source)
        size = source.stat().st_size
        with _s3_errors(uri, "upload"):
            # Multipart for large files (s3transfer); the digest travels as metadata.
            self.client().upload_file(
                str(source),
                location.bucket,
                location.key,
                ExtraArgs={"Metadata": {"sha256": digest}},
            )
        return StoredObject(uri, size, digest)

    def get_file(self, uri: str, target: Path) -> StoredObject:
        location = _object(uri)
        with _s3_errors(uri, "download"):
            body = self.client().get_object(Bucket=location.bucket, Key=location.key)["Body"]
            try:
                size, digest = _write_atomically(target, body.iter_chunks(CHUNK_BYTES))
            finally:
                body.close()
        return StoredObject(uri, size, digest)

    def size(self, uri: str) -> int | None:
        location = _object(uri)
        try:
            with _s3_errors(uri, "HEAD"):
                head = self.client().head_object(Bucket=location.bucket, Key=location.key)
        except ObjectNotFound:
            return None
        return int(head["ContentLength"])

    def chunks(self, uri: str, *, limit: int | None = None) -> Generator[bytes, None, None]:
        location = _object(uri)
        if limit is not None and limit <= 0:
            return
        extra = {"Range": f"bytes=0-{limit - 1}"} if limit is not None else {}
        with _s3_errors(uri, "read"):
            body = self.client().get_object(Bucket=location.bucket, Key=location.key, **extra)[
                "Body"
            ]
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            finally:
                body.close()

    def delete(self, uris: Sequence[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            location = _object(uri)
            by_bucket.setdefault(location.bucket, []).append(location.key)
        for bucket, keys in by_bucket.items():
            self._delete_keys(bucket, keys)

    def delete_prefix(self, uri: str) -> None:
        location = parse_s3_uri(uri)
        prefix = location.key if location.key.endswith("/") else location.key + "/"
        if prefix == "/":
            raise UnsupportedUri(f"{uri}: refusing to delete a whole bucket")
        with _s3_errors(uri, "list"):
            pages = self.client().get_paginator("list_objects_v2")
            keys = [
                item["Key"]
                for page in pages.paginate(Bucket=location.bucket, Prefix=prefix)
                for item in page.get("Contents", ())
            ]
        self._delete_keys(location.bucket, keys)

    def _delete_keys(self, bucket: str, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with _s3_errors(f"s3://{bucket}/{batch[0]}", "delete"):
                answer = self.client().delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{len(errors)} objects in s3://{bucket} were not deleted "
                    f"(s3://{bucket}/{first.get('Key')}: {first.get('Code')})"
                )


def _object(uri: str) -> S3Uri:
    location = parse_s3_uri(uri)
    if not location.key or location.key.endswith("/"):
        raise UnsupportedUri(f"{quote(uri)} names a bucket or a folder, not an object")
    return location


_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """boto3's errors as ours, each naming the URI."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as error:
        details = error.response.get("Error", {})
        code = str(details.get("Code", ""))
        if code in _MISSING_CODES:
            what = "its bucket does not exist" if code == "NoSuchBucket" else "does not exist"
            raise ObjectNotFound(f"{uri} {what}") from None
        if code in _DENIED_CODES:
            raise StorageError(
                f"{action} of {uri} was denied ({code}): check the credentials"
            ) from None
        raise StorageError(
            f"{action} of {uri} failed: {code} {details.get('Message', '')}".rstrip()
        ) from None
    except (BotoCoreError, Boto3Error) as error:
        # Unreachable endpoints, missing credentials, broken streams, failed uploads.
        raise StorageError(f"{action} of {uri} failed: {error}") from None


def _write_atomically(target: Path, chunks: Iterator[bytes]) -> tuple[int, str]:
    """Writes the chunks to a temporary file beside `target`, then renames it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def sha256_of(store: ObjectStore, uri: str) -> StoredObject:
    """The size and sha256 of an object, read through once."""
    digest, size = hashlib.sha256(), 0
    for chunk in store.chunks(uri):
        digest.update(chunk)
        size += len(chunk)
    return StoredObject(uri, size, digest.hexdigest())


def get_files(
    store: ObjectStore, transfers: Sequence[tuple[str, Path]], *, threads: int = TRANSFER_THREADS
) -> list[str]:
    """Downloads (uri, target) pairs in parallel; returns the URIs that do not exist.
    Any other failure stops the transfers and is raised."""
    if not transfers:
        return []

    def one(transfer: tuple[str, Path]) -> str | None:
        uri, target = transfer
        try:
            store.get_file(uri, target)
        except ObjectNotFound:
            return uri
        return None

    with ThreadPoolExecutor(max_workers=min(threads, len(transfers))) as pool:
        futures = [pool.submit(one, transfer) for transfer in transfers]
        try:
            results = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return sorted(uri for uri in results if uri is not None)


class Storage:
    """The backend of each URI scheme, and where new artifacts go."""

    def __init__(self, *, artifact_root: Path, artifact_store: str = "", s3: S3Store | None = None):
        self.local = LocalStore(artifact_root)
        self.s3 = s3 or S3Store()
        if artifact_store:
            base = parse_s3_uri(artifact_store)
            self._base = f"s3://{base.bucket}/{base.key.strip('/')}".rstrip("/")
        else:
            self._base = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        return cls(
            artifact_root=settings.resolved_artifact_root(),
            artifact_store=settings.artifact_store,
            s3=S3Store(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region),
        )

    @property
    def artifact_root(self) -> Path:
        return self.local.root

    @property
    def remote(self) -> bool:
        """Whether new artifacts go to object storage rather than the artifact root."""
        return bool(self._base)

    def store_for(self, uri: str) -> ObjectStore:
        scheme = urlparse(uri).scheme
        if scheme == "s3":
            return self.s3
        if scheme in ("", "file"):
            return self.local
        raise UnsupportedUri(
            f"{quote(uri)}: scheme {quote(scheme)} is not supported (file://, s3://)"
        )

    def artifact_uri(self, key: str) -> str:
        """Where the artifact `key` (a relative POSIX path such as models/<id>/checkpoint.pth)
        goes; a key ending in '/' names a folder."""
        if self._base:
            return f"{self._base}/{key}"
        return (self.local.root / key).as_uri() + ("/" if key.endswith("/") else "")

    def put_artifact(self, source: Path, key: str) -> StoredObject:
        uri = self.artifact_uri(key)
        return self.store_for(uri).put_file(source, uri)

    def size(self, uri: str) -> int | None:
        return self.store_for(uri).size(uri)

    def get_file(self, uri: str, target: Path) -> StoredObject:
        return self.store_for(uri).get_file(uri, target)

    def chunks(self, uri: str, *, limit: int | None = None) -> Generator[bytes, None, None]:
        return self.store_for(uri).chunks(uri, limit=limit)

    def owns(self, uri: str) -> bool:
        """Whether the object is one this system stores: under the artifact root, or
        under the configured object store prefix."""
        if urlparse(uri).scheme == "s3":
            return bool(self._base) and uri.startswith(self._base + "/")
        try:
            self.local.path_of(uri)
        except UnsupportedUri:
            return False
        return True

    def delete(self, uris: Sequence[str]) -> None:
        """Deletes the objects this system stores (`owns`); anything else is left alone,
        so a record pointing elsewhere never deletes someone's data."""
        owned = [uri for uri in uris if self.owns(uri)]
        self.local.delete([uri for uri in owned if urlparse(uri).scheme != "s3"])
        self.s3.delete([uri for uri in owned if urlparse(uri).scheme == "s3"])

    def delete_prefix(self, uri: str) -> None:
        self.store_for(uri).delete_prefix(uri)
