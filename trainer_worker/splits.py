"""Which images train, validate and test: the dataset's own `"split"` keys, or a
stratified split by the run's seed and fractions (docs/datasets.md)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer_worker.coco import check, invalid

# The key of a COCO `images[]` entry that names the split the image belongs to.
SPLIT_KEY = "split"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    """Image ids of each split, sorted."""

    train: list[int]
    val: list[int]
    test: list[int] = field(default_factory=list)


def stratified_split(
    classes_by_image: Mapping[int, frozenset[int]],
    *,
    image_ids: Sequence[int],
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.0,
) -> Split:
    """Deterministic train/val(/test) split of `image_ids` (sorted) for a seed.

    Every class keeps at least one image in train. Val is held out first, then test
    from the rest, each by its fraction of all the images: a split without test is the
    same as before test splits existed. Rare classes are placed first so that they
    reach val (then test) when they have images to spare; images without annotations
    are split by the same fractions.
    """
    rng = random.Random(seed)
    order = list(image_ids)
    rng.shuffle(order)
    # With a test split, val leaves at least one image for it.
    reserve = 1 if test_fraction > 0 else 0
    n_val = min(len(order) - 1 - reserve, max(1, round(len(order) * val_fraction)))
    val = _hold_out(order, classes_by_image, count=n_val, fraction=val_fraction)
    test: set[int] = set()
    if test_fraction > 0:
        rest = [i for i in order if i not in val]
        n_test = min(len(rest) - 1, max(1, round(len(order) * test_fraction)))
        # Targets relative to what val left, so that each split gets its share of a class.
        test = _hold_out(
            rest, classes_by_image, count=n_test, fraction=test_fraction / (1 - val_fraction)
        )
    train = sorted(i for i in order if i not in val and i not in test)
    return Split(train=train, val=sorted(val), test=sorted(test))


def _hold_out(
    order: Sequence[int],
    classes_by_image: Mapping[int, frozenset[int]],
    *,
    count: int,
    fraction: float,
) -> set[int]:
    """Up to `count` images of `order` (shuffled) to hold out, leaving each class at least
    one image among the rest."""
    images_with: Counter[int] = Counter()
    for image_id in order:
        images_with.update(classes_by_image.get(image_id, ()))
    held: set[int] = set()
    held_with: Counter[int] = Counter()

    def keeps_train_covered(image_id: int) -> bool:
        return all(held_with[c] + 1 < images_with[c] for c in classes_by_image.get(image_id, ()))

    def move(image_id: int) -> None:
        held.add(image_id)
        held_with.update(classes_by_image.get(image_id, ()))

    for cls in sorted(images_with, key=lambda c: (images_with[c], c)):
        target = min(images_with[cls] - 1, math.ceil(images_with[cls] * fraction))
        for image_id in order:
            if len(held) >= count or held_with[cls] >= target:
                break
            if (
                image_id not in held
                and cls in classes_by_image.get(image_id, ())
                and keeps_train_covered(image_id)
            ):
                move(image_id)

    negatives = [i for i in order if not classes_by_image.get(i)]
    for image_id in negatives[: round(len(negatives) * fraction)]:
        if len(held) < count:
            move(image_id)
    for image_id in order:
        if len(held) >= count:
            break
        if image_id not in held and keeps_train_covered(image_id):
            move(image_id)
    return held


def seeded_split(
    classes_by_image: Mapping[int, frozenset[int]],
    *,
    image_ids: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Split:
    needed = 3 if test_fraction > 0 else 2
    if len(image_ids) < needed:
        purpose = "one to train on, one to validate" + (", one to test" if needed == 3 else "")
        raise invalid(f"{len(image_ids)} image(s): at least {needed} are needed ({purpose})")
    split = stratified_split(
        classes_by_image,
        image_ids=image_ids,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    wanted = {"val": split.val, "test": split.test} if test_fraction > 0 else {"val": split.val}
    empty = [name for name, ids in wanted.items() if not ids]
    if empty:
        raise invalid(
            f"no image can be held out for {' or '.join(empty)} without taking the last "
            f"image of a class out of train ({len(image_ids)} images): add images of the "
            "rarest classes"
        )
    return split


def declared_splits(raw: list[Any]) -> dict[int, str] | None:
    """The split each image names by its `split` key; None when no image names one.
    Called after the images were validated (dicts with unique integer ids)."""
    named = {image["id"]: image[SPLIT_KEY] for image in raw if SPLIT_KEY in image}
    if not named:
        return None
    allowed = ", ".join(repr(s) for s in SPLITS)
    check(
        [image["id"] for image in raw if SPLIT_KEY not in image],
        f"images have no `{SPLIT_KEY}` key while others have one",
        f": give every image a `{SPLIT_KEY}` ({allowed}), or none to split by the run's seed",
    )
    check(
        [f"{image_id}: {value!r}" for image_id, value in named.items() if value not in SPLITS],
        f"images name an unknown `{SPLIT_KEY}`",
        f" (it is one of {allowed})",
    )
    return named


def dataset_split(
    declared: Mapping[int, str],
    classes_by_image: Mapping[int, frozenset[int]],
    categories: Mapping[int, str],
) -> Split:
    by_split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for image_id in sorted(declared):
        by_split[declared[image_id]].append(image_id)
    split = Split(train=by_split["train"], val=by_split["val"], test=by_split["test"])
    empty = [name for name in ("train", "val") if not by_split[name]]
    if empty:
        raise invalid(
            f"the dataset's `{SPLIT_KEY}` keys put no image in {' and '.join(empty)}: "
            f'at least one image needs "{SPLIT_KEY}": "train" and one "{SPLIT_KEY}": "val"'
        )
    in_train = {c for image_id in split.train for c in classes_by_image.get(image_id, ())}
    check(
        [categories[c] for c in sorted(categories) if c not in in_train],
        "classes have no annotated image in the dataset's train split",
        f': a model cannot learn a class it never sees; set "{SPLIT_KEY}": "train" on an '
        f"image of each, or remove the `{SPLIT_KEY}` keys to split by the run's seed",
    )
    return split
