"""SPIFFE ids: strict parsing, and prefix matching on whole path segments."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class InvalidSpiffeId(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    segments: tuple[str, ...]

    def __str__(self) -> str:
        return "spiffe://" + "/".join((self.trust_domain, *self.segments))

    def starts_with(self, prefix: SpiffeId) -> bool:
        """True when `prefix` names this id's trust domain and its first path segments.

        `spiffe://td/ns/ml` covers `spiffe://td/ns/ml/sa/x`, never `spiffe://td/ns/ml-x/...`.
        """
        n = len(prefix.segments)
        return self.trust_domain == prefix.trust_domain and self.segments[:n] == prefix.segments


def parse(text: str, *, allow_empty_path: bool = False) -> SpiffeId:
    """Parses `spiffe://trust-domain/path` per the SPIFFE-ID spec's character rules."""
    scheme, sep, rest = text.partition("://")
    if scheme != "spiffe" or not sep:
        raise InvalidSpiffeId("not a spiffe:// URI")
    domain, _, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise InvalidSpiffeId("invalid trust domain")
    segments = tuple(path.split("/")) if path else ()
    if not segments and not allow_empty_path:
        raise InvalidSpiffeId("no path")
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidSpiffeId("invalid path segment")
    return SpiffeId(domain, segments)
