"""Where each process serves `/metrics` (RAVEN_METRICS_ADDR). Pure Python: the CLI reads it.

One setting, read by every process, with a default of its own per process, so that a
service and a worker started side by side with nothing set do not collide. "" or "off"
serves nothing; port 0 picks a free port (the process exposes the one it bound).
"""

from __future__ import annotations

TRAINING_RUNS_METRICS_ADDR = "127.0.0.1:9464"
TRAINED_MODELS_METRICS_ADDR = "127.0.0.1:9465"
WORKER_METRICS_ADDR = "127.0.0.1:9466"
_OFF = ("", "off")


def metrics_address(setting: str | None, default: str) -> str | None:
    """The address to serve `/metrics` on; None when metrics are off."""
    if setting is None:
        return default
    value = setting.strip()
    return None if value.lower() in _OFF else value


def split_address(address: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) of "127.0.0.1:9464"; "[::1]:9464" for IPv6."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)
