"""Where TrainingRunService spends a figure's time (`python -m benchmarks --profile DIR`):
py-spy samples the service's processes while the figure runs, and each figure gets its
collapsed stacks (`<figure>.txt`, flamegraph input) and a summary (`<figure>.summary.txt`):
how busy the process was, the share of samples by library, and the functions with the most
samples, on the stack (inclusive) and at its top (self).

`python -m benchmarks.profiles FILE` prints the summary of a collapsed-stacks file."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

RATE_HZ = 100
TOP = 25
_CHECKOUT = str(Path(__file__).resolve().parents[1]) + "/"

# A frame of py-spy's raw format: "function (path/to/file.py:line)".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::\d+)?\)$")
# Libraries by the path of their files, first match wins; "other" is the rest of the
# standard library and whatever is not named here. SQLAlchemy's async sessions run their
# work in greenlets, which py-spy shows as stacks of their own, without the caller's frames:
# the shares by library count them, the inclusive times of callers do not.
_LIBRARIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("grpc", ("/grpc/",)),
    ("asyncpg", ("/asyncpg/",)),
    ("sqlalchemy", ("/sqlalchemy/",)),
    ("nats", ("/nats/",)),
    ("protobuf", ("/protobuf/",)),
    # The API's and the SDK's modules; without --full-filenames py-spy leaves out the
    # namespace package (trace/__init__.py).
    ("opentelemetry", ("/opentelemetry/", "/trace/", "/sdk/", "/propagate/", "/baggage/")),
    ("prometheus", ("/prometheus_client/",)),
    ("structlog", ("/structlog/",)),
    ("asyncio", ("/asyncio/",)),
    # asyncio.to_thread's pool, and threads of their own.
    ("threads", ("/concurrent/futures/", "/threading.py")),
    ("logging", ("/logging/",)),
    ("services", ("/services/",)),
    ("shared", ("/shared/",)),
)


def py_spy() -> str:
    """The py-spy of this interpreter's environment (a development dependency)."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: `make setup` installs it")
    return found


@contextlib.asynccontextmanager
async def profiled(pid: int, folder: Path | None, figure: str) -> AsyncIterator[None]:
    """Samples process `pid` and its children while the body runs, when `folder` is set."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once per figure)
    raw, log = folder / f"{figure}.txt", folder / f"{figure}.py-spy.log"
    with log.open("wb") as output:
        recorder = await asyncio.create_subprocess_exec(
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--full-filenames",
            "--rate",
            str(RATE_HZ),
            "--format",
            "raw",
            "--output",
            str(raw),
            stdout=output,
            stderr=output,
        )
    started = time.monotonic()
    try:
        yield
    finally:
        seconds = time.monotonic() - started
        recorder.send_signal(signal.SIGINT)
        await recorder.wait()
        if raw.exists():
            text = summary(raw.read_text().splitlines(), seconds=seconds)
        else:
            text = f"py-spy wrote no samples (exit {recorder.returncode}); its output: {log.name}\n"
        (folder / f"{figure}.summary.txt").write_text(text)


_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class _Frame:
    function: str
    file: str

    @property
    def library(self) -> str:
        # py-spy names a file from its sys.path entry on (grpc/aio/_server.py), or whole.
        path = "/" + self.file.lstrip("/")
        for name, parts in _LIBRARIES:
            if any(part in path for part in parts):
                return name
        return "other"

    def __str__(self) -> str:
        return f"{self.function} ({_short(self.file)})"


def summary(lines: Iterable[str], *, seconds: float | None = None) -> str:
    """The summary of py-spy's raw (collapsed) stacks: one `frame;frame;... count` a line,
    the outermost frame first."""
    own: Counter[_Frame] = Counter()
    inclusive: Counter[_Frame] = Counter()
    libraries: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # py-spy starts each stack with the process and the thread: not frames of code.
        frames = [f for f in map(_parse, stack.split(";")) if f is not None]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        libraries[frames[-1].library] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return "no samples: the process was idle, or py-spy could not read it\n"
    out = [f"{total:,} samples at {RATE_HZ} Hz"]
    if seconds:
        out[0] += f" over {seconds:.1f} s: {total / RATE_HZ / seconds:.0%} of one core busy"
    out.append("\nself time by library (the frame on top of the stack)")
    out += [f"  {share:6.1%}  {name}" for name, share in _shares(libraries, total)]
    out.append("\nfunctions by inclusive time (on the stack)")
    out += [f"  {share:6.1%}  {frame}" for frame, share in _shares(inclusive, total)[:TOP]]
    out.append("\nfunctions by self time (on top of the stack)")
    out += [f"  {share:6.1%}  {frame}" for frame, share in _shares(own, total)[:TOP]]
    return "\n".join(out) + "\n"


def _parse(text: str) -> _Frame | None:
    match = _FRAME.match(text.strip())
    if match is None:
        return None
    return _Frame(match["function"], match["file"])


def _shares(counts: Counter[_K], total: int) -> list[tuple[_K, float]]:
    """Largest first; ties in name order, so that a summary reads the same each time."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return [(key, count / total) for key, count in ranked]


def _short(path: str) -> str:
    """The path from its package on: .../site-packages/grpc/aio/_call.py -> grpc/aio/_call.py,
    .../lib/python3.11/asyncio/events.py -> asyncio/events.py, the project's from the
    checkout on (services/training_runs/reads.py)."""
    if path.startswith(_CHECKOUT):
        return path.removeprefix(_CHECKOUT)
    for marker in ("/site-packages/", "/lib/python3."):
        _, found, tail = path.partition(marker)
        if found:
            return tail if marker == "/site-packages/" else tail.partition("/")[2]
    return path


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]).read_text().splitlines()), end="")
