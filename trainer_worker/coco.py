"""A COCO annotation file, read and checked: every problem a person can fix in their data
becomes a `DatasetError` whose message says what is wrong, where, and how many times."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer_worker.images import MAX_PIXELS

# Boxes may overshoot the image by rounding in annotation tools.
_EDGE_TOLERANCE_PX = 1.0
_EXAMPLES = 3
_JSON_NUMBERS = (int, float)


class DatasetError(Exception):
    """A dataset the worker cannot train on. `reason` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def unreadable(message: str) -> DatasetError:
    return DatasetError("dataset_unreadable", message)


def invalid(message: str) -> DatasetError:
    return DatasetError("dataset_invalid", message)


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise unreadable(f"annotation file {path} does not exist") from None
    except OSError as error:
        raise unreadable(f"cannot read annotation file {path}: {error.strerror}") from None


def parse(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise unreadable(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise invalid(f"{path}: a COCO file is a JSON object, found {type(document).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in document]
    if missing:
        raise invalid(f"{path}: missing COCO key(s) {', '.join(missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document[key], list):
            raise invalid(f"{path}: `{key}` must be a list")
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


def sample(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def check(problems: Sequence[object], what: str, hint: str) -> None:
    if problems:
        raise invalid(f"{len(problems)} {what} ({sample(problems)}){hint}")


def validated_categories(raw: list[Any]) -> dict[int, str]:
    if not raw:
        raise invalid("no categories: the dataset declares no classes to learn")
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
    check(malformed, "categories lack an integer `id` or a non-empty `name`", "")
    check(duplicate_ids, "duplicate category ids", "")
    names = Counter(categories.values())
    check([n for n, c in names.items() if c > 1], "category names are used twice", "")
    return categories


def validated_images(raw: list[Any]) -> dict[int, tuple[str, float, float]]:
    if not raw:
        raise invalid("no images: `images` is empty")
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
    check(
        malformed,
        "images lack an integer `id`, a `file_name` or a positive `width`/`height`",
        "",
    )
    check(duplicate_ids, "duplicate image ids", "")
    check(
        [
            f"{file_name}: {width}x{height}"
            for file_name, width, height in images.values()
            if width * height > MAX_PIXELS
        ],
        f"images declare more than {MAX_PIXELS:,} pixels",
        ": tile or shrink them",
    )
    return images


def validated_annotations(
    raw: list[Any],
    images: Mapping[int, tuple[str, float, float]],
    categories: Mapping[int, str],
) -> tuple[dict[int, frozenset[int]], Counter[int]]:
    if not raw:
        raise invalid("no annotations: there is nothing to learn from")
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
    check(malformed, "annotations lack an integer `id` or a `bbox` of 4 numbers", "")
    check(duplicates, "duplicate annotation ids", "")
    check(unknown_image, "annotations refer to images that are not in `images`", "")
    check(unknown_category, "annotations refer to unknown categories", "")
    check(empty_box, "boxes have a non-positive width or height", " (bbox is [x, y, w, h])")
    check(outside, "boxes lie outside their image", " (bbox is [x, y, w, h] in pixels)")
    return {k: frozenset(v) for k, v in classes_by_image.items()}, instances
