"""Figures: values per round, their median/min/max, and their ratio to a baseline."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN without samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite)}


@dataclass(slots=True)
class Figure:
    """One measured quantity over rounds; `baseline` names the figure it is divided by."""

    name: str
    unit: str
    description: str
    rounds: list[float] = field(default_factory=list)
    baseline: str | None = None
    # Per-round value / baseline value of the same round.
    ratios: list[float] = field(default_factory=list)
    # Lower is better (latency, memory) or higher is better (throughput).
    lower_is_better: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": self.unit,
            "description": self.description,
            "lower_is_better": self.lower_is_better,
            **_cleaned(spread(self.rounds)),
            "rounds": [_clean(v) for v in self.rounds],
        }
        if self.baseline is not None:
            out["baseline"] = self.baseline
            out["ratio"] = _cleaned(spread(self.ratios))
            out["ratio_rounds"] = [_clean(v) for v in self.ratios]
        return out


def _cleaned(values: dict[str, float]) -> dict[str, float | None]:
    return {k: _clean(v) for k, v in values.items()}


def _clean(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


class Results:
    """Every figure of a run, by name, in the order they were first recorded."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.notes: dict[str, str] = {}

    def add(
        self,
        name: str,
        value: float,
        *,
        unit: str,
        description: str,
        baseline: str | None = None,
        lower_is_better: bool = True,
    ) -> None:
        """Records one round's value; with `baseline`, also its ratio to that figure's
        value of the same round (the baseline's latest round)."""
        figure = self.figures.get(name)
        if figure is None:
            figure = self.figures[name] = Figure(
                name, unit, description, baseline=baseline, lower_is_better=lower_is_better
            )
        figure.rounds.append(value)
        if baseline is not None:
            base = self.figures[baseline].rounds[-1]
            figure.ratios.append(value / base if base else math.nan)

    def add_latencies(
        self, prefix: str, seconds: list[float], *, description: str, baseline: str | None
    ) -> None:
        """Records the p50 and p99 of `seconds` in ms as `<prefix>.p50` and `<prefix>.p99`,
        each against the same percentile of `baseline` when given."""
        for q in (50, 99):
            self.add(
                f"{prefix}.p{q}",
                percentile(seconds, q) * 1000,
                unit="ms",
                description=f"{description}: p{q} latency",
                baseline=baseline and f"{baseline}.p{q}",
            )

    def median(self, name: str) -> float:
        return spread(self.figures[name].rounds)["median"] if name in self.figures else math.nan

    def ratio(self, name: str) -> float:
        figure = self.figures.get(name)
        return spread(figure.ratios)["median"] if figure and figure.ratios else math.nan

    def to_json(self) -> dict[str, Any]:
        return {name: figure.to_json() for name, figure in self.figures.items()}
