"""A real S3 API on loopback for the tests: moto's server, dummy credentials, one bucket."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

BUCKET = "raven-test"
# Dummy credentials: moto accepts any; boto3 refuses to sign without some.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(slots=True)
class S3Server:
    endpoint: str
    bucket: str
    _client: Any = field(default=None, init=False, repr=False)

    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        return self._client

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        body = self.client().get_object(Bucket=self.bucket, Key=key)["Body"]
        return bytes(body.read())

    def keys(self, prefix: str) -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.get(key)).hexdigest()


@contextmanager
def running_s3() -> Iterator[S3Server]:
    """Starts moto's server on a free loopback port with one bucket. Dummy credentials and
    AWS_ENDPOINT_URL_S3 go into the environment meanwhile: every S3 client made from the
    default configuration (the in-process services', and processes started with this
    environment) talks to it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        with pytest.MonkeyPatch.context() as env:
            for name, value in CREDENTIALS.items():
                env.setenv(name, value)
            env.delenv("AWS_PROFILE", raising=False)
            env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            s3 = S3Server(endpoint=endpoint, bucket=BUCKET)
            s3.client().create_bucket(Bucket=BUCKET)
            yield s3
    finally:
        server.stop()
