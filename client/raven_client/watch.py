"""Following a run's events across dropped streams."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from raven_client._proto.raven.training.v1 import training_run_pb2
from raven_client.errors import from_rpc_error
from raven_client.retry import RetryHook, RetryPolicy

Event = training_run_pb2.TrainingRunEvent
# Opens WatchTrainingRun for the events after a sequence; the call can be cancelled.
OpenStream = Callable[[int], Iterable[Event]]

_METHOD = "/raven.training.v1.TrainingRunService/WatchTrainingRun"


def follow(
    open_stream: OpenStream,
    after_sequence: int,
    policy: RetryPolicy,
    *,
    on_retry: RetryHook | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Event]:
    """Every event after `after_sequence`, in order and once, until the server ends the
    stream (the run ended); live progress events (`live`) as they come, outside that order. A stream that fails UNAVAILABLE (the server went away or
    restarted) is reopened after the last event yielded, `policy` deciding how often in
    a row and how long to wait; other failures raise their typed exception."""
    last = after_sequence
    failures = 0
    while True:
        stream = open_stream(last)
        try:
            for event in stream:
                if event.live:  # progress ahead of its entry, outside the sequence
                    yield event
                    continue
                if event.sequence <= last:
                    continue
                last = event.sequence
                failures = 0
                yield event
            return
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            failures += 1
            if error.code != grpc.StatusCode.UNAVAILABLE or failures >= policy.attempts:
                raise error from rpc_error
        finally:
            if isinstance(stream, grpc.Call):
                stream.cancel()
        wait = policy.backoff_s(failures)
        if on_retry is not None:
            on_retry(_METHOD, failures, error, wait)
        sleep(wait)
