"""COCO dataset preparation: read and validate (trainer_worker.coco), check the images,
fingerprint, split (trainer_worker.splits), and write the files training reads.

Every problem a person can fix in their data becomes a `DatasetError`; the worker
reports it as the run's failure and does not retry the job.

A dataset defines its own splits when its images carry a `"split"` key
("train", "val" or "test"): all of them or none. Without one, the worker splits
the images by the run's seed, val_fraction and test_fraction (docs/datasets.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from trainer_worker.coco import (
    DatasetError,
    invalid,
    parse,
    read,
    sample,
    unreadable,
    validated_annotations,
    validated_categories,
    validated_images,
)
from trainer_worker.images import ImageProblems, check_images, find_image_root
from trainer_worker.splits import dataset_split, declared_splits, seeded_split

__all__ = ["DatasetError", "PreparedDataset", "prepare_dataset", "resolve_location"]


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


def resolve_location(uri: str, *, artifact_root: Path) -> Path:
    """`file:///abs`, `/abs` or a path relative to the artifact root, as an absolute path.
    s3:// locations are downloaded first (trainer_worker/remote.py), never resolved here."""
    if not uri:
        raise unreadable("the training spec names no dataset (dataset_uri is empty)")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise unreadable(f"{uri!r}: file URIs must be local (file:///path)")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise unreadable(
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
        raise invalid(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise invalid(
            f"test_fraction must be 0 or more and leave images to train on "
            f"(val_fraction {val_fraction}), got {test_fraction}"
        )
    raw = read(annotation_path)
    document = parse(raw, annotation_path)

    categories = validated_categories(document["categories"])
    images = validated_images(document["images"])
    annotations = document["annotations"]
    per_image_classes, instances = validated_annotations(annotations, images, categories)
    declared = declared_splits(document["images"])
    root = (
        image_root
        if image_root is not None
        else find_image_root((name for name, _, _ in images.values()), annotation_path)
    )
    try:
        image_sizes = check_images(images, root)
    except ImageProblems as problems:
        raise invalid(str(problems)) from None

    empty = [categories[cid] for cid in sorted(categories) if instances[cid] == 0]
    if empty:
        raise invalid(
            f"{len(empty)} categories have no annotations ({sample(empty)}): a model cannot "
            "learn a class it never sees; annotate them or remove them from `categories`"
        )
    if declared is None:
        split = seeded_split(
            per_image_classes,
            image_ids=sorted(images),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    else:
        split = dataset_split(declared, per_image_classes, categories)

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
