"""How much of each figure to measure: the full suite, or the smoke mode that only
keeps the harness working."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    mode: str
    rounds: int
    # Unary RPCs.
    unary_duration_s: float
    concurrencies: tuple[int, ...] = (1, 16, 64)
    bulk_runs: int
    deep_offset: int
    page_size: int = 50
    # Event latency.
    watcher_counts: tuple[int, ...]
    event_rounds: int
    events_per_round: int
    fanout_runs: int
    watchers_per_run: int
    fanout_rate_per_s: float
    fanout_events_per_run: int
    # Sustained throughput of the worker-event path: progress reports per round.
    apply_events: int
    # Outbox.
    outbox_samples: int
    outbox_backlog: int
    outbox_rounds: int
    # Training overhead (the slow one).
    training: bool
    training_rounds: int
    # Dataset preparation.
    dataset_images: int
    boxes_per_image: int = 10
    dataset_rounds: int


FULL = Plan(
    mode="full",
    rounds=5,
    unary_duration_s=2.0,
    bulk_runs=100_000,
    deep_offset=90_000,
    watcher_counts=(1, 100, 1000),
    event_rounds=3,
    events_per_round=10,
    # A fleet of 1,000 GPUs reporting once a second, a watcher each.
    fanout_runs=1000,
    watchers_per_run=1,
    fanout_rate_per_s=1000.0,
    fanout_events_per_run=5,
    apply_events=20_000,
    outbox_samples=50,
    outbox_backlog=100_000,
    outbox_rounds=3,
    training=True,
    # One run takes a minute or more on 2 busy cores.
    training_rounds=1,
    dataset_images=100_000,
    dataset_rounds=3,
)

SMOKE = Plan(
    mode="smoke",
    rounds=2,
    unary_duration_s=0.1,
    bulk_runs=2_000,
    deep_offset=1_500,
    watcher_counts=(1, 10),
    event_rounds=2,
    events_per_round=3,
    fanout_runs=4,
    watchers_per_run=2,
    fanout_rate_per_s=50.0,
    fanout_events_per_run=2,
    apply_events=200,
    outbox_samples=5,
    outbox_backlog=1_000,
    outbox_rounds=2,
    training=False,
    training_rounds=1,
    dataset_images=2_000,
    dataset_rounds=2,
)
