"""What a person reads first when training crashed: the exception, then a short traceback.

The training child's log holds mmengine's banners, hook tables and, at its end, the
traceback. `describe_crash` turns that log into a message that starts with the exception
("TypeError: AdamW.__init__() got an unexpected keyword argument 'momentum'"), follows with
the last frames of its traceback, their paths relative to the run's folder or to the
installed package they belong to, and names where the whole log is. No absolute path of the
worker machine leaves in it.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from pathlib import Path

# Bounds of what a failure message carries; the log artifact has the rest.
MESSAGE_MAX_CHARS = 2000
_FRAMES_KEPT = 6
_EXCEPTION_MAX_LINES = 6
_TAIL_LINES = 8
# Exceptions that only say another process failed: the cause is in an earlier traceback.
_WRAPPERS = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError",)

_TRACEBACK = "Traceback (most recent call last):"
_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
_ABSOLUTE = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)*[\w.@+-]+")
_PACKAGE_DIRS = ("site-packages/", "dist-packages/")
# mmengine prefixes its log lines with a date and a logger name.
_LOG_PREFIX = re.compile(r"^\d{2}/\d{2} \d{2}:\d{2}:\d{2} - \S+ - \w+ - ")


def describe_crash(
    log_text: str, *, returncode: int, roots: Sequence[Path] = (), log_artifact: str = "log"
) -> str:
    """The failure message of a training child that exited with `returncode`.

    `roots` are folders whose paths are shown relative to them (the run's folder, the
    code's checkout); any other absolute path keeps only its last two parts.
    """
    scrub = _Scrubber(roots)
    found = _last_traceback(log_text.splitlines())
    if found is not None:
        frames, exception = found
        parts = [scrub("\n".join(exception))]
        if frames:
            shown = frames[-_FRAMES_KEPT:]
            omitted = len(frames) - len(shown)
            header = "Traceback, last frames" + (f" ({omitted} earlier omitted)" if omitted else "")
            parts.append(header + ":\n" + "\n".join(scrub(frame) for frame in shown))
    else:
        lines = [line for line in log_text.splitlines() if line.strip()][-_TAIL_LINES:]
        parts = [_exit_status(returncode)]
        if lines:
            parts.append("The log ends with:\n" + "\n".join(scrub(line) for line in lines))
    footer = f"The whole log is the run's `{log_artifact}` artifact."
    return _bounded("\n\n".join(parts), MESSAGE_MAX_CHARS - len(footer) - 2) + "\n\n" + footer


def _last_traceback(lines: list[str]) -> tuple[list[str], list[str]] | None:
    """(frames, exception lines) of the last traceback that is not a mere wrapper."""
    starts = [i for i, line in enumerate(lines) if line.strip().endswith(_TRACEBACK)]
    chosen: tuple[list[str], list[str]] | None = None
    for start in starts:
        frames: list[str] = []
        index = start + 1
        while index < len(lines):
            match = _FRAME.match(_LOG_PREFIX.sub("", lines[index]))
            if match is None:
                if lines[index].startswith((" ", "\t")) and frames:
                    index += 1  # the source line of the frame above
                    continue
                break
            frames.append(f"{match['path']}:{match['line']} in {match['func'].strip()}")
            index += 1
        exception = [
            _LOG_PREFIX.sub("", line).rstrip()
            for line in lines[index : index + _EXCEPTION_MAX_LINES]
        ]
        exception = _until_blank(exception)
        if not exception:
            continue
        if chosen is not None and exception[0].startswith(_WRAPPERS):
            continue
        chosen = (frames, exception)
    return chosen


def _until_blank(lines: list[str]) -> list[str]:
    kept: list[str] = []
    for line in lines:
        if not line.strip() or line.strip().startswith(_TRACEBACK):
            break
        kept.append(line)
    return kept


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with status {returncode}"


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)].rstrip() + "…"


class _Scrubber:
    def __init__(self, roots: Sequence[Path]) -> None:
        # Longest first, so that a run folder inside the checkout wins.
        self._roots = sorted(
            {str(root.resolve()).rstrip("/") + "/" for root in roots}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        return _ABSOLUTE.sub(lambda match: self._relative(match.group(0)), text)

    def _relative(self, path: str) -> str:
        # Installed packages first: a virtual environment may live inside a root.
        for marker in _PACKAGE_DIRS:
            if marker in path:
                return path.split(marker, 1)[1]
        for root in self._roots:
            if path.startswith(root):
                return path[len(root) :]
            if path == root.rstrip("/"):
                return "."
        parts = [part for part in path.split("/") if part]
        return ".../" + "/".join(parts[-2:]) if len(parts) > 2 else path
