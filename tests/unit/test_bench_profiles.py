"""The benchmark's profile summary (benchmarks.profiles): shares by library and by function
from py-spy's collapsed stacks, and a real recording of a busy process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from benchmarks.profiles import profiled, summary

RAW = [
    'process 7:"python -m services.training_runs.main";'
    "_run_once (asyncio/base_events.py:1922);"
    "_handle (grpc/aio/_server.py:300);"
    "get (services/training_runs/reads.py:40);"
    "execute (sqlalchemy/engine/base.py:1400) 30",
    'process 7:"python -m services.training_runs.main";'
    "_run_once (asyncio/base_events.py:1922);"
    "_handle (grpc/aio/_server.py:300);"
    "get (services/training_runs/reads.py:41) 10",
    'process 7:"python -m services.training_runs.main";_run_once (asyncio/base_events.py:1922) 60',
    "not a line of samples",
]


def _section(text: str, heading: str) -> list[str]:
    lines = text.split(heading, 1)[1].strip("\n").split("\n\n", 1)[0].splitlines()
    return [" ".join(line.split()) for line in lines]


def test_shares_by_library_and_function_add_line_numbers_together() -> None:
    text = summary(RAW, seconds=2.0)
    assert text.startswith("100 samples at 100 Hz over 2.0 s: 50% of one core busy")
    libraries = _section(text, "(the frame on top of the stack)")
    assert libraries == ["60.0% asyncio", "30.0% sqlalchemy", "10.0% services"]
    inclusive = _section(text, "by inclusive time (on the stack)")
    # Both lines of `get` are one function; every sample passes through the event loop.
    assert inclusive[:3] == [
        "100.0% _run_once (asyncio/base_events.py)",
        "40.0% _handle (grpc/aio/_server.py)",
        "40.0% get (services/training_runs/reads.py)",
    ]
    own = _section(text, "by self time (on top of the stack)")
    assert own[0] == "60.0% _run_once (asyncio/base_events.py)"


def test_no_samples_is_said() -> None:
    assert summary(["garbage"]).startswith("no samples")


BUSY = """
import time
def spin_for_the_profile():
    end = time.monotonic() + 30
    while time.monotonic() < end:
        sum(range(1000))
print("ready", flush=True)
spin_for_the_profile()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="py-spy reads another process's memory")
async def test_a_busy_process_is_profiled_into_its_figure(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BUSY, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None and await process.stdout.readline() == b"ready\n"
        async with profiled(process.pid, tmp_path, "busy"):
            await asyncio.sleep(1.5)
    finally:
        process.kill()
        await process.wait()
    text = (tmp_path / "busy.summary.txt").read_text()
    assert (tmp_path / "busy.txt").stat().st_size > 0
    own = _section(text, "by self time (on top of the stack)")
    assert own[0].split(" ", 1)[1].startswith("spin_for_the_profile"), text
    assert float(own[0].split("%")[0]) > 50, text


def test_full_file_names_are_shown_from_their_package_or_the_checkout() -> None:
    checkout = str(Path(__file__).resolve().parents[2])
    raw = [
        "_handle (/opt/venv/lib/python3.11/site-packages/grpc/aio/_server.py:300);"
        f"get ({checkout}/services/training_runs/reads.py:40) 3",
        "_run_once (/usr/lib/python3.11/asyncio/base_events.py:1922) 1",
    ]
    text = summary(raw)
    assert _section(text, "(the frame on top of the stack)") == ["75.0% services", "25.0% asyncio"]
    assert _section(text, "by inclusive time (on the stack)") == [
        "75.0% _handle (grpc/aio/_server.py)",
        "75.0% get (services/training_runs/reads.py)",
        "25.0% _run_once (asyncio/base_events.py)",
    ]
