"""Which epoch is best, decided the same way in the child and the parent."""

from __future__ import annotations

from collections.abc import Mapping

PRIMARY_METRIC = "coco/bbox_mAP"


def best_epoch(evaluations: Mapping[int, Mapping[str, float]], *, last_epoch: int) -> int | None:
    """The epoch with the highest `coco/bbox_mAP`, the earliest on ties; `last_epoch` when no
    epoch produced a mAP; None when no epoch finished at all."""
    scored = [(e, m[PRIMARY_METRIC]) for e, m in evaluations.items() if PRIMARY_METRIC in m]
    if scored:
        return min(scored, key=lambda item: (-item[1], item[0]))[0]
    return last_epoch if last_epoch > 0 else None
