"""The policy file: which workload identities and end-user claims hold which permissions.

TOML (or JSON with the same shape), a list of grants, each with one selector:

    [[grant]]
    spiffe_id = "spiffe://raven.local/ns/ml/sa/scheduler"   # exactly this identity
    permissions = ["training_runs.read", "training_runs.create"]

    [[grant]]
    spiffe_prefix = "spiffe://raven.local/ns/ml"            # whole leading path segments
    permissions = ["training_runs.read.own"]

    [[grant]]
    claim = "groups"                                        # an end-user JWT claim: equal to
    value = "ml-engineers"                                  # `value`, or a list holding it
    permissions = ["trained_models.read"]

Unknown permission names reject the whole file, so a typo fails loudly instead
of silently granting nothing. The file is re-read when its stat changes,
checked at most once per `check_interval_s`; a broken edit keeps the last good policy.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from shared.auth import spiffe
from shared.auth.permissions import KNOWN_PERMISSIONS

log = structlog.get_logger(__name__)

EMPTY: frozenset[str] = frozenset()


class PolicyError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Policy:
    exact: Mapping[str, frozenset[str]] = field(default_factory=dict)
    prefixes: tuple[tuple[spiffe.SpiffeId, frozenset[str]], ...] = ()
    claims: tuple[tuple[str, str, frozenset[str]], ...] = ()

    def for_workload(self, identity: str) -> frozenset[str]:
        granted = set(self.exact.get(identity, EMPTY))
        if self.prefixes:
            try:
                parsed = spiffe.parse(identity)
            except spiffe.InvalidSpiffeId:
                parsed = None
            if parsed is not None:
                for prefix, permissions in self.prefixes:
                    if parsed.starts_with(prefix):
                        granted |= permissions
        return frozenset(granted)

    def for_claims(self, claims: Mapping[str, Any]) -> frozenset[str]:
        granted: set[str] = set()
        for name, value, permissions in self.claims:
            held = claims.get(name)
            if held == value or (isinstance(held, list) and value in held):
                granted |= permissions
        return frozenset(granted)


def parse(data: Mapping[str, Any]) -> Policy:
    grants = data.get("grant", [])
    if not isinstance(grants, list):
        raise PolicyError("`grant` must be a list of tables")
    exact: dict[str, set[str]] = {}
    prefixes: list[tuple[spiffe.SpiffeId, frozenset[str]]] = []
    claims: list[tuple[str, str, frozenset[str]]] = []
    for index, grant in enumerate(grants):
        where = f"grant #{index + 1}"
        if not isinstance(grant, dict):
            raise PolicyError(f"{where}: not a table")
        permissions = _permissions(grant.get("permissions"), where)
        selectors = [k for k in ("spiffe_id", "spiffe_prefix", "claim") if k in grant]
        unknown = set(grant) - {"spiffe_id", "spiffe_prefix", "claim", "value", "permissions"}
        if len(selectors) != 1 or unknown:
            raise PolicyError(
                f"{where}: needs exactly one of spiffe_id, spiffe_prefix, claim (+ value)"
            )
        try:
            if "spiffe_id" in grant:
                identity = str(spiffe.parse(_text(grant["spiffe_id"], where)))
                exact.setdefault(identity, set()).update(permissions)
            elif "spiffe_prefix" in grant:
                prefix = spiffe.parse(
                    _text(grant["spiffe_prefix"], where).rstrip("/"), allow_empty_path=True
                )
                prefixes.append((prefix, permissions))
            else:
                claims.append(
                    (_text(grant["claim"], where), _text(grant.get("value"), where), permissions)
                )
        except spiffe.InvalidSpiffeId as error:
            raise PolicyError(f"{where}: {error}") from error
    return Policy(
        exact={k: frozenset(v) for k, v in exact.items()},
        prefixes=tuple(prefixes),
        claims=tuple(claims),
    )


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{where}: expected a non-empty string")
    return value


def _permissions(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise PolicyError(f"{where}: `permissions` must be a list of names")
    unknown = sorted(set(value) - KNOWN_PERMISSIONS)
    if unknown:
        raise PolicyError(f"{where}: unknown permissions {unknown}")
    return frozenset(value)


def load(path: Path) -> Policy:
    raw = path.read_bytes()
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: {error}") from error
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a table at the top")
    return parse(data)


class PolicyStore:
    """The current policy of a file, reloaded when the file changes."""

    def __init__(
        self,
        path: Path | None,
        *,
        check_interval_s: float = 1.0,
        fallback: Policy | None = None,
    ) -> None:
        self._path = path
        self._interval = check_interval_s
        self._policy = fallback or Policy()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        if path is not None:
            # A broken or missing file at start is an error, not an empty policy.
            self._stamp = _stamp(path)
            self._policy = load(path)

    def current(self) -> Policy:
        if self._path is None:
            return self._policy
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._checked = now
            self._reload_if_changed(self._path)
        return self._policy

    def _reload_if_changed(self, path: Path) -> None:
        try:
            stamp = _stamp(path)
            if stamp == self._stamp:
                return
            policy = load(path)
        except (OSError, PolicyError) as error:
            log.error("policy file unreadable; keeping the previous policy", error=str(error))
            return
        self._stamp, self._policy = stamp, policy
        log.info("policy reloaded", path=str(path))


def _stamp(path: Path) -> tuple[int, int, int]:
    # Inode too: an atomic rename-over has a new inode even within one mtime tick.
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


def grants(entries: Iterable[tuple[str, Iterable[str]]]) -> str:
    """TOML text granting each exact SPIFFE id its permissions (tests and `make certs`)."""
    lines = []
    for identity, permissions in entries:
        names = ", ".join(json.dumps(p) for p in permissions)
        lines += [
            "[[grant]]",
            f"spiffe_id = {json.dumps(identity)}",
            f"permissions = [{names}]",
            "",
        ]
    return "\n".join(lines)
