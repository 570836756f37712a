"""The goals of the design checked against a run, and the tables of docs/benchmarks.md."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from benchmarks.stats import Results

MIB_2GB = 2048.0


def goals(results: Results) -> list[dict[str, Any]]:
    """Each goal of the issue with the measured value; `met` is None when not measured."""
    m = results.median
    list_ratio = m("unary.list_deep.c1.p50") / m("unary.list_first.c1.p50")
    first_progress_gap = m("training.first_progress_s") - m("training.bare_first_iter_s")
    rows = [
        (
            "GetTrainingRun at 64 callers >= 50% of the echo baseline's throughput",
            results.ratio("unary.get.c64.throughput"),
            ">=",
            0.5,
            "x echo",
        ),
        (
            "Deep-page ListTrainingRuns p50 within 2x of the first page (1 caller)",
            list_ratio,
            "<=",
            2.0,
            "x first page",
        ),
        (
            "ListTrainingRuns first page at 64 callers >= 25% of the echo baseline's throughput",
            results.ratio("unary.list_first.c64.throughput"),
            ">=",
            0.25,
            "x echo",
        ),
        (
            "CreateTrainingRun at 64 callers >= 10% of the echo baseline's throughput",
            results.ratio("unary.create.c64.throughput"),
            ">=",
            0.1,
            "x echo",
        ),
        (
            "Event latency p99 < 10 ms, worker publish -> 1 watcher",
            m("events.run1.w1.p99"),
            "<",
            10.0,
            "ms",
        ),
        (
            "Event latency p99 < 50 ms with 1,000 watchers of one run",
            m("events.run1.w1000.p99"),
            "<",
            50.0,
            "ms",
        ),
        (
            "Fleet of 1,000 runs x 1 watcher at 1,000 events/s: p99 < 100 ms",
            m("events.fleet.p99") if _full_fleet(results) else math.nan,
            "<",
            100.0,
            "ms",
        ),
        (
            "Fleet: no backlog (every report recorded < 1 s after the last was published)",
            m("events.fleet.backlog_s") if _full_fleet(results) else math.nan,
            "<",
            1.0,
            "s",
        ),
        (
            "Worker events recorded by one process >= 1,000 events/s sustained",
            m("events.apply.rate"),
            ">=",
            1000.0,
            "events/s",
        ),
        (
            "Training overhead ratio <= 1.10 on the tiny run",
            results.ratio("training.system_wall_s"),
            "<=",
            1.10,
            "x bare Runner",
        ),
        (
            "First progress event < 2 s plus model build time (bare time to first iteration)",
            first_progress_gap,
            "<",
            2.0,
            "s beyond bare",
        ),
        (
            "Dataset preparation of 100,000 images < 30 s",
            m("dataset.prepare.seconds") if _full_dataset(results) else math.nan,
            "<",
            30.0,
            "s",
        ),
        (
            "Dataset preparation of 100,000 images < 2 GB peak memory",
            m("dataset.prepare.peak_rss") if _full_dataset(results) else math.nan,
            "<",
            MIB_2GB,
            "MiB",
        ),
    ]
    out = []
    for goal, value, op, target, unit in rows:
        met = None
        if math.isfinite(value):
            met = {"<": value < target, "<=": value <= target, ">=": value >= target}[op]
        out.append(
            {
                "goal": goal,
                "value": round(value, 4) if math.isfinite(value) else None,
                "target": f"{op} {target}",
                "unit": unit,
                "met": met,
            }
        )
    return out


def _full_fleet(results: Results) -> bool:
    return results.median("events.fleet.sent_per_s") >= 900.0


def _full_dataset(results: Results) -> bool:
    return results.median("dataset.images") >= 100_000


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def table(document: Mapping[str, Any]) -> str:
    """Markdown: one row per figure, then the goals."""
    lines = [
        "| figure | unit | median | min | max | baseline | ratio (median, min-max) |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name, f in document["figures"].items():
        ratio = ""
        if "ratio" in f:
            r = f["ratio"]
            ratio = f"{_fmt(r['median'])} ({_fmt(r['min'])}-{_fmt(r['max'])})"
        lines.append(
            f"| `{name}` | {f['unit']} | {_fmt(f['median'])} | {_fmt(f['min'])} | "
            f"{_fmt(f['max'])} | {('`' + f['baseline'] + '`') if 'baseline' in f else ''} | "
            f"{ratio} |"
        )
    lines += ["", "| goal | measured | target | met |", "|---|---:|---|---|"]
    for g in document["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {_fmt(g['value'])} {g['unit']} | {g['target']} | {met} |")
    return "\n".join(lines)


def _cell(f: Mapping[str, Any] | None, *, ratio: bool = True) -> str:
    if f is None:
        return "-"
    text = f"{_fmt(f['median'])} ({_fmt(f['min'])}-{_fmt(f['max'])})"
    if ratio and "ratio" in f:
        text += f", **{_fmt(f['ratio']['median'])}x**"
    return text


def compact(document: Mapping[str, Any]) -> str:
    """The tables of docs/benchmarks.md: median (min-max) over rounds, and the median of
    the per-round ratios to the baseline in bold."""
    figures = document["figures"]
    lines: list[str] = []
    if any(n.startswith("unary.") for n in figures):
        lines += [
            "### 1. Unary RPCs (calls/s and ms; ratio to the echo server at the same concurrency)",
            "",
            "| RPC | callers | throughput | p50 | p99 |",
            "|---|---:|---|---|---|",
        ]
    for rpc in ("echo", "get", "list_first", "list_deep", "create"):
        for c in document["plan"]["concurrencies"]:
            p = f"unary.{rpc}.c{c}"
            if p + ".throughput" in figures:
                lines.append(
                    f"| {rpc} | {c} | {_cell(figures.get(p + '.throughput'))} | "
                    f"{_cell(figures.get(p + '.p50'))} | {_cell(figures.get(p + '.p99'))} |"
                )
    sections = [
        ("2. Event latency, worker publish -> watcher (ms; ratio to bare NATS)", "events."),
        ("3. Outbox", "outbox."),
        ("4. Training overhead", "training."),
        ("5. Dataset preparation", "dataset."),
        ("6. Service memory (RSS)", "memory."),
    ]
    for title, prefix in sections:
        names = [n for n in figures if n.startswith(prefix)]
        if not names:
            continue
        lines += [
            "",
            f"### {title}",
            "",
            "| figure | unit | median (min-max), ratio |",
            "|---|---|---|",
        ]
        lines += [f"| `{n}` | {figures[n]['unit']} | {_cell(figures[n])} |" for n in names]
    lines += ["", "### Goals", "", "| goal | measured | target | met |", "|---|---:|---|---|"]
    for g in document["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {_fmt(g['value'])} {g['unit']} | {g['target']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    print(compact(json.loads(open(sys.argv[1]).read())))
