"""`python -m benchmarks [--smoke] [--only GROUP ...] [--skip-training] [--processes N]
[--profile DIR]`: runs the suite
against the real stack, writes `.data/bench/<time>.json` (and `latest.json`) and prints
a table."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import machine, report
from benchmarks.dataset import measure_dataset
from benchmarks.events import measure_events
from benchmarks.outbox import measure_outbox
from benchmarks.plan import FULL, SMOKE, Plan
from benchmarks.stack import ROOT, Stack, open_stack
from benchmarks.stats import Results
from benchmarks.training import measure_training
from benchmarks.unary import measure_unary

GROUPS = ("unary", "events", "memory", "outbox", "training", "dataset")
DEFAULT_OUT = ROOT / ".data" / "bench"


async def run(
    plan: Plan,
    groups: tuple[str, ...],
    out_dir: Path,
    *,
    processes: int = 1,
    connections: int = 1,
    profile_dir: Path | None = None,
) -> dict[str, object]:
    results = Results()
    started = time.monotonic()
    skipped: dict[str, str] = {}
    if "training" in groups and not plan.training:
        skipped["training"] = f"not part of the {plan.mode} plan (use --training)"
        groups = tuple(g for g in groups if g != "training")
    work_dir = out_dir / "work"
    async with open_stack(
        work_dir, processes=processes, connections=connections, profile_dir=profile_dir
    ) as stack:
        await stack.start_services()
        results.add(
            "memory.training_runs.idle",
            _mib(stack, "training_runs"),
            unit="MiB",
            description="RSS of the TrainingRunService process, idle",
        )
        results.add(
            "memory.trained_models.idle",
            _mib(stack, "trained_models"),
            unit="MiB",
            description="RSS of the TrainedModelService process, idle",
        )
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("unary", lambda: measure_unary(stack, plan, results)),
            ("events", lambda: measure_events(stack, plan, results, memory="memory" in groups)),
            ("outbox", lambda: measure_outbox(stack, plan, results)),
            ("training", lambda: measure_training(stack, plan, results)),
        ]
        for name, step in steps:
            if name in groups:
                await _timed(name, step)
    if "dataset" in groups:
        await _timed("dataset", lambda: measure_dataset(plan, results, out_dir / "datasets"))
    return {
        "schema": 1,
        "mode": plan.mode,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine.facts(),
        "versions": machine.versions(),
        "plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__},
        "processes": processes,
        "connections": connections,
        "profiled": profile_dir is not None,
        "skipped": skipped,
        "notes": results.notes,
        "figures": results.to_json(),
        "goals": report.goals(results),
    }


def _mib(stack: Stack, name: str) -> float:
    return stack.children[name].rss_bytes() / 2**20


async def _timed(name: str, step: Callable[[], Awaitable[None]]) -> None:
    began = time.monotonic()
    print(f"-- {name} ...", flush=True)
    await step()
    print(f"-- {name}: {time.monotonic() - began:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, to keep it working")
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run only these groups")
    parser.add_argument("--skip-training", action="store_true", help="leave out figure 4")
    parser.add_argument("--training", action="store_true", help="include figure 4 in --smoke")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--processes", type=int, default=1, help="processes per service (RAVEN_GRPC_PROCESSES)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        help="connections the unary load spreads over (default: 1, or 4 per process with "
        "--processes above 1)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile TrainingRunService during the last round of the unary RPCs at 64 callers, the "
        "1,000-watcher, "
        "recorded, fleet and sustained figures with py-spy, into DIR (benchmarks.profiles); "
        "the sampling takes CPU, so a profiled run's figures are not for comparison",
    )
    args = parser.parse_args(argv)
    connections = args.connections or (1 if args.processes == 1 else 4 * args.processes)
    logging.basicConfig(level=logging.WARNING)

    plan = SMOKE if args.smoke else FULL
    if args.training:
        plan = Plan(
            **{**{k: getattr(plan, k) for k in plan.__dataclass_fields__}, "training": True}
        )
    groups = tuple(args.only or GROUPS)
    if args.skip_training:
        groups = tuple(g for g in groups if g != "training")
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    document = asyncio.run(
        run(
            plan,
            groups,
            out_dir,
            processes=args.processes,
            connections=connections,
            profile_dir=args.profile.resolve() if args.profile else None,
        )
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(document, indent=2)
    (out_dir / f"{plan.mode}-{stamp}.json").write_text(text)
    (out_dir / f"latest-{plan.mode}.json").write_text(text)
    print(report.table(document))
    print(f"\nwritten: {out_dir / f'{plan.mode}-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
