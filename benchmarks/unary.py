"""Figure 1: unary GetTrainingRun, ListTrainingRuns (first and a deep page) and
CreateTrainingRun at 1/16/64 concurrent callers, against a bare grpc.aio echo server
run the same way (its own process, the same client)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from sqlalchemy import text

from benchmarks.echo import METHOD
from benchmarks.plan import Plan
from benchmarks.stack import Stack, free_port, spawn, wait_for_grpc
from benchmarks.stats import Results
from services.training_runs.repository import RunFilter
from shared import pagination
from shared.db.engine import create_engine
from shared.proto.raven.training.v1 import training_run_pb2 as pb
from shared.proto.raven.training.v1 import training_run_pb2_grpc

Call = Callable[[], Awaitable[object]]
DATASET_URI = "datasets/bench/annotations.json"

_BULK_INSERT = text(
    """
    INSERT INTO training_runs
        (id, display_name, state, spec, architecture, dataset_uri, creator, create_time)
    SELECT gen_random_uuid(), 'bench run ' || g, 'SUCCEEDED',
           jsonb_build_object('dataset_uri', CAST(:uri AS text),
                              'architecture', 'retinanet_r18_fpn'),
           'retinanet_r18_fpn', :uri, 'bench', now() - make_interval(secs => g / 10)
    FROM generate_series(1, :n) AS g
    """
)


async def load(call: Call, *, concurrency: int, duration_s: float) -> tuple[float, list[float]]:
    """Calls from `concurrency` callers for `duration_s`; returns (calls/s, latencies in s)."""
    latencies: list[float] = []
    start = time.perf_counter()
    stop = start + duration_s

    async def caller() -> None:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), latencies


async def _each_once(call: Call, count: int, *, concurrency: int) -> None:
    """`count` calls, `concurrency` at a time."""
    remaining = iter(range(count))

    async def caller() -> None:
        for _ in remaining:
            await call()

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def bulk_insert_runs(stack: Stack, count: int, *, deep_offset: int) -> tuple[list[str], str]:
    """Inserts `count` SUCCEEDED runs with SQL; returns some of their names and a page
    token pointing deep into the newest-first listing."""
    engine = create_engine(stack.settings.database_url, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.execute(_BULK_INSERT, {"uri": DATASET_URI, "n": count})
        async with engine.connect() as connection:
            await connection.execute(text("ANALYZE training_runs"))
            ids = (
                await connection.execute(
                    text("SELECT id FROM training_runs TABLESAMPLE SYSTEM (5) LIMIT 2000")
                )
            ).scalars().all() or (
                await connection.execute(text("SELECT id FROM training_runs LIMIT 2000"))
            ).scalars().all()
            row = (
                await connection.execute(
                    text(
                        "SELECT create_time, id FROM training_runs "
                        "ORDER BY create_time DESC, id DESC OFFSET :k LIMIT 1"
                    ),
                    {"k": deep_offset},
                )
            ).one()
    finally:
        await engine.dispose()
    # The token the server would have issued after serving `deep_offset` runs unfiltered.
    fingerprint = pagination.query_fingerprint({k: str(v) for k, v in asdict(RunFilter()).items()})
    pagination.use_keys(stack.settings.page_token_key_list())
    token = pagination.encode(pagination.Cursor(row.create_time, str(row.id)), fingerprint)
    return [f"trainingRuns/{i}" for i in ids], token


def write_dataset_stub(stack: Stack) -> None:
    """The service only checks that the annotation file exists."""
    path = stack.artifact_root / DATASET_URI
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))


def create_request() -> pb.CreateTrainingRunRequest:
    return pb.CreateTrainingRunRequest(
        training_run=pb.TrainingRun(
            display_name="bench run",
            labels={"bench": "unary"},
            spec=pb.TrainingSpec(
                dataset_uri=DATASET_URI, architecture="retinanet_r18_fpn", epochs=2, batch_size=4
            ),
        ),
        request_id=str(uuid.uuid4()),
    )


async def measure_unary(stack: Stack, plan: Plan, results: Results) -> None:
    write_dataset_stub(stack)
    names, deep_token = await bulk_insert_runs(stack, plan.bulk_runs, deep_offset=plan.deep_offset)
    echo_port = free_port()
    echo = await spawn(
        "echo", ["-m", "benchmarks.echo", str(echo_port)], env={}, log_dir=stack.log_dir
    )
    stack.children["echo"] = echo
    await wait_for_grpc(echo, echo_port)
    picks = itertools.cycle(random.Random(0).sample(names, len(names)))
    echo_payload = pb.GetTrainingRunRequest(name=names[0]).SerializeToString()

    # The echo server is called over as many connections as the service.
    echo_channels, runs_channels = stack.channels(echo_port), stack.channels(stack.runs_port)
    try:
        echo_calls = itertools.cycle([c.unary_unary(METHOD) for c in echo_channels])
        stubs = itertools.cycle(
            [training_run_pb2_grpc.TrainingRunServiceStub(c) for c in runs_channels]
        )

        async def list_deep() -> object:
            page = await next(stubs).ListTrainingRuns(
                pb.ListTrainingRunsRequest(page_size=plan.page_size, page_token=deep_token)
            )
            assert len(page.training_runs) == plan.page_size, "the deep page is not full"
            return page

        calls: dict[str, Call] = {
            "echo": lambda: next(echo_calls)(echo_payload),
            "get": lambda: next(stubs).GetTrainingRun(pb.GetTrainingRunRequest(name=next(picks))),
            "list_first": lambda: next(stubs).ListTrainingRuns(
                pb.ListTrainingRunsRequest(page_size=plan.page_size)
            ),
            "list_deep": list_deep,
            "create": lambda: next(stubs).CreateTrainingRun(create_request()),
        }
        for call in calls.values():  # Warm-up: connections, pools, lazy imports.
            await load(call, concurrency=4, duration_s=min(0.5, plan.unary_duration_s))
        # The first read of a row the bulk insert wrote stores its message (a row written by
        # the service has it already): read each run Get will pick once, so that every round
        # measures the reads of stored messages.
        await _each_once(calls["get"], len(names), concurrency=max(plan.concurrencies))
        busiest = max(plan.concurrencies)
        for round_index in range(plan.rounds):
            for concurrency in plan.concurrencies:
                for rpc, call in calls.items():
                    last = round_index == plan.rounds - 1
                    profiling = last and concurrency == busiest and rpc != "echo"
                    async with stack.profiled(f"unary.{rpc}.c{concurrency}", when=profiling):
                        rate, latencies = await load(
                            call, concurrency=concurrency, duration_s=plan.unary_duration_s
                        )
                    _record(results, rpc, concurrency, rate, latencies)
    finally:
        for channel in (*echo_channels, *runs_channels):
            await channel.close()
    await echo.stop()
    del stack.children["echo"]


_LABELS = {
    "echo": "bare grpc.aio echo (baseline)",
    "get": "GetTrainingRun",
    "list_first": "ListTrainingRuns, first page",
    "list_deep": "ListTrainingRuns, deep page",
    "create": "CreateTrainingRun",
}


def _record(
    results: Results, rpc: str, concurrency: int, rate: float, latencies: list[float]
) -> None:
    prefix, base = f"unary.{rpc}.c{concurrency}", f"unary.echo.c{concurrency}"
    baseline = None if rpc == "echo" else base
    what = f"{_LABELS[rpc]} at {concurrency} concurrent callers"
    results.add(
        f"{prefix}.throughput",
        rate,
        unit="calls/s",
        description=what,
        baseline=baseline and f"{base}.throughput",
        lower_is_better=False,
    )
    results.add_latencies(prefix, latencies, what=what, baseline=baseline)
