"""Progress reports of many runs, recorded together: a group commit.

A report waits while the batch before it is being written, then goes in the next
one with every report that arrived meanwhile (up to `max_batch`): at a trickle each
report gets a transaction of its own at once, under load one transaction records
the ticks of many runs (handlers.apply_progress_reports). The caller of `record`
learns whether its report was applied once its batch has committed, so a message is
acknowledged only after its report is in Postgres, as every other report is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from services.training_runs.handlers import WorkerReport

ApplyBatch = Callable[[Sequence[WorkerReport]], Awaitable[list[bool]]]


class ProgressRecorder:
    def __init__(
        self,
        apply: ApplyBatch,
        *,
        max_batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._apply = apply
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._waiting: list[tuple[WorkerReport, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, report: WorkerReport) -> bool:
        """Whether the report was applied (False: stale, not newer, or the run is over).
        Raises what writing its batch raised."""
        applied: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((report, applied))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_batches())
        return await applied

    async def drain(self) -> None:
        """Waits for the batches being written."""
        if self._writer is not None:
            await asyncio.wait({self._writer})

    async def _write_batches(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    results = await self._apply([report for report, _ in batch])
                except asyncio.CancelledError:
                    for _, waiter in batch:
                        waiter.cancel()
                    raise
                except Exception as error:
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(error)
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                for (_, waiter), applied in zip(batch, results, strict=True):
                    if not waiter.done():  # its caller may have given up
                        waiter.set_result(applied)
        finally:
            self._writer = None
            for _, waiter in self._waiting:
                waiter.cancel()
            self._waiting.clear()
