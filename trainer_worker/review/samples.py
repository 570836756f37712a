"""The images worth looking at: the ones a model gets most wrong, and most right."""

from __future__ import annotations

from collections.abc import Sequence

from trainer_worker.review.results import ImageErrors, Samples


def select_samples(per_image: Sequence[ImageErrors], *, k: int) -> Samples:
    """The `k` images with the most errors (FP + FN) and the `k` with the fewest, ties
    broken by the lower image id. The two never share an image: with fewer than 2k images,
    the worst are chosen first and the best come from the rest."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    worst = sorted(per_image, key=lambda i: (-i.errors, i.image_id))[:k]
    chosen = {i.image_id for i in worst}
    rest = [i for i in per_image if i.image_id not in chosen]
    best = sorted(rest, key=lambda i: (i.errors, i.image_id))[:k]
    return Samples(worst=tuple(worst), best=tuple(best))
