"""COCO dataset preparation: read, validate, fingerprint and split.

Every problem a person can fix in their data becomes a `DatasetError` whose
message says what is wrong, where, and how many times; the worker reports it
as the run's failure and does not retry the job.

A dataset defines its own splits when its images carry a `"split"` key
("train", "val" or "test"): all of them or none. Without one, the worker splits
the images by the run's seed, val_fraction and test_fraction (docs/datasets.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from trainer_worker.images import MAX_PIXELS, ImageProblems, check_images, find_image_root

# Boxes may overshoot the image by rounding in annotation tools.
_EDGE_TOLERANCE_PX = 1.0
_EXAMPLES = 3
_JSON_NUMBERS = (int, float)
# The key of a COCO `images[]` entry that names the split the image belongs to.
SPLIT_KEY = "split"
SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """A dataset the worker cannot train on. `reason` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _unreadable(message: str) -> DatasetError:
    return DatasetError("dataset_unreadable", message)


def _invalid(message: str) -> DatasetError:
    return DatasetError("dataset_invalid", message)


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedDataset:
    """A validated dataset split into the files the training config points to."""

    annotation_path: Path
    image_root: Path
    train_path: Path
    val_path: Path
    # None when the dataset has no test split.
    test_path: Path | None
    split_path: Path
    # Ordered by COCO category id: label i of the model is classes[i].
    classes: tuple[str, ...]
    image_count: int
    annotation_count: int
    instances_per_class: Mapping[str, int]
    train_image_count: int
    val_image_count: int
    test_image_count: int
    split_seed: int
    # "seed": split by the worker; "dataset": the images' own `split` keys.
    split_source: str
    fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    """Image ids of each split, sorted."""

    train: list[int]
    val: list[int]
    test: list[int] = field(default_factory=list)


def resolve_location(uri: str, *, artifact_root: Path) -> Path:
    """`file:///abs`, `/abs` or a path relative to the artifact root, as an absolute path.
    s3:// locations are downloaded first (trainer_worker/remote.py), never resolved here."""
    if not uri:
        raise _unreadable("the training spec names no dataset (dataset_uri is empty)")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise _unreadable(f"{uri!r}: file URIs must be local (file:///path)")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise _unreadable(
            f"{uri!r}: this worker reads datasets from s3:// URIs and local files "
            f"(file:///..., an absolute path, or a path under {artifact_root})"
        )
    path = Path(uri)
    return path if path.is_absolute() else artifact_root / path


def prepare_dataset(
    *,
    annotation_path: Path,
    image_root: Path | None,
    out_dir: Path,
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.0,
) -> PreparedDataset:
    """Validates a COCO annotation file and writes train.json, val.json, test.json (when
    there is a test split) and split.json into `out_dir`. Images are resolved against
    `image_root` (default: the annotation file's folder, or the `images/` folder beside
    it); each must lie inside it and be an image of its declared size. The fractions and the seed
    apply only to a dataset that does not define its splits."""
    if not 0.0 < val_fraction < 1.0:
        raise _invalid(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise _invalid(
            f"test_fraction must be 0 or more and leave images to train on "
            f"(val_fraction {val_fraction}), got {test_fraction}"
        )
    raw = _read(annotation_path)
    document = _parse(raw, annotation_path)

    categories = _validated_categories(document["categories"])
    images = _validated_images(document["images"])
    annotations = document["annotations"]
    per_image_classes, instances = _validated_annotations(annotations, images, categories)
    declared = _declared_splits(document["images"])
    root = (
        image_root
        if image_root is not None
        else find_image_root((name for name, _, _ in images.values()), annotation_path)
    )
    try:
        image_sizes = check_images(images, root)
    except ImageProblems as problems:
        raise _invalid(str(problems)) from None

    empty = [categories[cid] for cid in sorted(categories) if instances[cid] == 0]
    if empty:
        raise _invalid(
            f"{len(empty)} categories have no annotations ({_sample(empty)}): a model cannot "
            "learn a class it never sees; annotate them or remove them from `categories`"
        )
    if declared is None:
        split = _seeded_split(
            per_image_classes,
            image_ids=sorted(images),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    else:
        split = _dataset_split(declared, per_image_classes, categories)

    fingerprint = _fingerprint(raw, image_sizes)
    del raw

    ordered_ids = sorted(categories)
    classes = tuple(categories[cid] for cid in ordered_ids)
    # Contiguous ids in category-id order: mmdet derives label order from the file's order.
    new_id = {cid: i + 1 for i, cid in enumerate(ordered_ids)}
    out_dir.mkdir(parents=True, exist_ok=True)
    # One resolve: a hundred thousand would cost seconds of lstat calls. check_images
    # found every file name inside the root.
    resolved_root = str(root.resolve())
    for image in document["images"]:
        path = os.path.join(resolved_root, image["file_name"])
        # After a symlink, '..' climbs from its target: the file checked is the real path.
        image["file_name"] = (
            os.path.realpath(path) if ".." in image["file_name"] else os.path.normpath(path)
        )
    for annotation in annotations:
        annotation["category_id"] = new_id[annotation["category_id"]]
    new_categories = [
        {"id": new_id[cid], "name": categories[cid], "supercategory": ""} for cid in ordered_ids
    ]
    train_path = out_dir / "train.json"
    val_path = out_dir / "val.json"
    test_path = out_dir / "test.json" if split.test else None
    _write_subset(train_path, document, set(split.train), new_categories)
    _write_subset(val_path, document, set(split.val), new_categories)
    if test_path is not None:
        _write_subset(test_path, document, set(split.test), new_categories)
    source = "seed" if declared is None else "dataset"
    membership: dict[str, Any] = {"source": source}
    if declared is None:
        membership.update(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    membership.update(train=split.train, val=split.val, test=split.test)
    split_path = out_dir / "split.json"
    split_path.write_text(json.dumps(membership, indent=None))
    return PreparedDataset(
        annotation_path=annotation_path,
        image_root=root,
        train_path=train_path,
        val_path=val_path,
        test_path=test_path,
        split_path=split_path,
        classes=classes,
        image_count=len(images),
        annotation_count=len(annotations),
        instances_per_class={categories[cid]: instances[cid] for cid in ordered_ids},
        train_image_count=len(split.train),
        val_image_count=len(split.val),
        test_image_count=len(split.test),
        split_seed=seed,
        split_source=source,
        fingerprint=fingerprint,
    )


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


def _seeded_split(
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
        raise _invalid(f"{len(image_ids)} image(s): at least {needed} are needed ({purpose})")
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
        raise _invalid(
            f"no image can be held out for {' or '.join(empty)} without taking the last "
            f"image of a class out of train ({len(image_ids)} images): add images of the "
            "rarest classes"
        )
    return split


def _declared_splits(raw: list[Any]) -> dict[int, str] | None:
    """The split each image names by its `split` key; None when no image names one.
    Called after the images were validated (dicts with unique integer ids)."""
    named = {image["id"]: image[SPLIT_KEY] for image in raw if SPLIT_KEY in image}
    if not named:
        return None
    allowed = ", ".join(repr(s) for s in SPLITS)
    _check(
        [image["id"] for image in raw if SPLIT_KEY not in image],
        f"images have no `{SPLIT_KEY}` key while others have one",
        f": give every image a `{SPLIT_KEY}` ({allowed}), or none to split by the run's seed",
    )
    _check(
        [f"{image_id}: {value!r}" for image_id, value in named.items() if value not in SPLITS],
        f"images name an unknown `{SPLIT_KEY}`",
        f" (it is one of {allowed})",
    )
    return named


def _dataset_split(
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
        raise _invalid(
            f"the dataset's `{SPLIT_KEY}` keys put no image in {' and '.join(empty)}: "
            f'at least one image needs "{SPLIT_KEY}": "train" and one "{SPLIT_KEY}": "val"'
        )
    in_train = {c for image_id in split.train for c in classes_by_image.get(image_id, ())}
    _check(
        [categories[c] for c in sorted(categories) if c not in in_train],
        "classes have no annotated image in the dataset's train split",
        f': a model cannot learn a class it never sees; set "{SPLIT_KEY}": "train" on an '
        f"image of each, or remove the `{SPLIT_KEY}` keys to split by the run's seed",
    )
    return split


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _unreadable(f"annotation file {path} does not exist") from None
    except OSError as error:
        raise _unreadable(f"cannot read annotation file {path}: {error.strerror}") from None


def _parse(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unreadable(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise _invalid(f"{path}: a COCO file is a JSON object, found {type(document).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in document]
    if missing:
        raise _invalid(f"{path}: missing COCO key(s) {', '.join(missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document[key], list):
            raise _invalid(f"{path}: `{key}` must be a list")
    return document


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_box(bbox: list[Any]) -> bool:
    """Four finite numbers. JSON numbers are exactly int or float (bool is its own type)."""
    if all(type(v) in _JSON_NUMBERS for v in bbox):
        return (
            math.isfinite(bbox[0])
            and math.isfinite(bbox[1])
            and math.isfinite(bbox[2])
            and math.isfinite(bbox[3])
        )
    return all(_is_number(v) for v in bbox)


def _sample(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _check(problems: Sequence[object], what: str, hint: str) -> None:
    if problems:
        raise _invalid(f"{len(problems)} {what} ({_sample(problems)}){hint}")


def _validated_categories(raw: list[Any]) -> dict[int, str]:
    if not raw:
        raise _invalid("no categories: the dataset declares no classes to learn")
    categories: dict[int, str] = {}
    malformed, duplicate_ids = [], []
    for i, category in enumerate(raw):
        if not (
            isinstance(category, dict)
            and _is_int(category.get("id"))
            and isinstance(category.get("name"), str)
            and category["name"].strip()
        ):
            malformed.append(f"#{i}")
        elif category["id"] in categories:
            duplicate_ids.append(category["id"])
        else:
            categories[category["id"]] = category["name"]
    _check(malformed, "categories lack an integer `id` or a non-empty `name`", "")
    _check(duplicate_ids, "duplicate category ids", "")
    names = Counter(categories.values())
    _check([n for n, c in names.items() if c > 1], "category names are used twice", "")
    return categories


def _validated_images(raw: list[Any]) -> dict[int, tuple[str, float, float]]:
    if not raw:
        raise _invalid("no images: `images` is empty")
    images: dict[int, tuple[str, float, float]] = {}
    malformed, duplicate_ids = [], []
    for i, image in enumerate(raw):
        if not (
            isinstance(image, dict)
            and _is_int(image.get("id"))
            and isinstance(image.get("file_name"), str)
            and image["file_name"]
            and _is_number(image.get("width"))
            and _is_number(image.get("height"))
            and image["width"] > 0
            and image["height"] > 0
        ):
            malformed.append(f"#{i}")
        elif image["id"] in images:
            duplicate_ids.append(image["id"])
        else:
            images[image["id"]] = (image["file_name"], image["width"], image["height"])
    _check(
        malformed,
        "images lack an integer `id`, a `file_name` or a positive `width`/`height`",
        "",
    )
    _check(duplicate_ids, "duplicate image ids", "")
    _check(
        [
            f"{file_name}: {width}x{height}"
            for file_name, width, height in images.values()
            if width * height > MAX_PIXELS
        ],
        f"images declare more than {MAX_PIXELS:,} pixels",
        ": tile or shrink them",
    )
    return images


def _validated_annotations(
    raw: list[Any],
    images: Mapping[int, tuple[str, float, float]],
    categories: Mapping[int, str],
) -> tuple[dict[int, frozenset[int]], Counter[int]]:
    if not raw:
        raise _invalid("no annotations: there is nothing to learn from")
    seen: set[int] = set()
    malformed, duplicates, unknown_image, unknown_category, empty_box, outside = (
        [],
        [],
        [],
        [],
        [],
        [],
    )
    classes_by_image: dict[int, set[int]] = {}
    instances: Counter[int] = Counter({cid: 0 for cid in categories})
    for i, annotation in enumerate(raw):
        bbox = annotation.get("bbox") if isinstance(annotation, dict) else None
        if not (
            isinstance(annotation, dict)
            and _is_int(annotation.get("id"))
            and isinstance(bbox, list)
            and len(bbox) == 4
            and _is_box(bbox)
        ):
            malformed.append(f"#{i}")
            continue
        ann_id: int = annotation["id"]
        # Checked against the known ids below before use as keys.
        image_id: Any = annotation.get("image_id")
        category_id: Any = annotation.get("category_id")
        if ann_id in seen:
            duplicates.append(ann_id)
            continue
        seen.add(ann_id)
        if image_id not in images:
            unknown_image.append(f"{ann_id} -> image {image_id}")
            continue
        if category_id not in categories:
            unknown_category.append(f"{ann_id} -> category {category_id}")
            continue
        x, y, w, h = bbox
        _, width, height = images[image_id]
        if w <= 0 or h <= 0:
            empty_box.append(f"{ann_id}: {bbox}")
            continue
        if (
            x < -_EDGE_TOLERANCE_PX
            or y < -_EDGE_TOLERANCE_PX
            or x + w > width + _EDGE_TOLERANCE_PX
            or y + h > height + _EDGE_TOLERANCE_PX
        ):
            outside.append(f"{ann_id}: {bbox} in {width}x{height}")
            continue
        classes_by_image.setdefault(image_id, set()).add(category_id)
        instances[category_id] += 1
    _check(malformed, "annotations lack an integer `id` or a `bbox` of 4 numbers", "")
    _check(duplicates, "duplicate annotation ids", "")
    _check(unknown_image, "annotations refer to images that are not in `images`", "")
    _check(unknown_category, "annotations refer to unknown categories", "")
    _check(empty_box, "boxes have a non-positive width or height", " (bbox is [x, y, w, h])")
    _check(outside, "boxes lie outside their image", " (bbox is [x, y, w, h] in pixels)")
    return {k: frozenset(v) for k, v in classes_by_image.items()}, instances


def _fingerprint(raw: bytes, image_sizes: Mapping[str, int]) -> str:
    digest = hashlib.sha256(raw)
    for name in sorted(image_sizes):
        digest.update(f"\0{name}\0{image_sizes[name]}".encode())
    return digest.hexdigest()


def _write_subset(
    path: Path, document: Mapping[str, Any], image_ids: set[int], categories: list[Any]
) -> None:
    subset = {
        "images": [i for i in document["images"] if i["id"] in image_ids],
        "annotations": [a for a in document["annotations"] if a["image_id"] in image_ids],
        "categories": categories,
    }
    # json.dumps runs the C encoder; json.dump to a file would encode in Python, chunk by chunk.
    path.write_text(json.dumps(subset))
