from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainer_worker.dataset import (
    DatasetError,
    prepare_dataset,
    resolve_location,
    stratified_split,
)

Document = dict[str, Any]


def coco(images: int = 10, classes: tuple[str, ...] = ("dump", "tire")) -> Document:
    """Image i holds one box of class i % len(classes); category ids are 10, 20, ..."""
    return {
        "images": [
            {"id": i, "file_name": f"img/{i}.jpg", "width": 100, "height": 80}
            for i in range(1, images + 1)
        ],
        "annotations": [
            {
                "id": 100 + i,
                "image_id": i,
                "category_id": 10 * (1 + i % len(classes)),
                "bbox": [10, 10, 20, 30],
                "iscrowd": 0,
            }
            for i in range(1, images + 1)
        ],
        "categories": [{"id": 10 * (k + 1), "name": name} for k, name in enumerate(classes)],
    }


@pytest.fixture
def write(tmp_path: Path) -> Callable[[Document], Path]:
    def _write(document: Document) -> Path:
        for image in document.get("images", []):
            path = tmp_path / "data" / image["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * image["id"])
        annotation = tmp_path / "data" / "annotations.json"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        annotation.write_text(json.dumps(document))
        return annotation

    return _write


def prepare(annotation: Path, tmp_path: Path, seed: int = 0, val_fraction: float = 0.2) -> Any:
    return prepare_dataset(
        annotation_path=annotation,
        image_root=None,
        out_dir=tmp_path / "out",
        val_fraction=val_fraction,
        seed=seed,
    )


def reason_of(annotation: Path, tmp_path: Path) -> tuple[str, str]:
    with pytest.raises(DatasetError) as caught:
        prepare(annotation, tmp_path)
    return caught.value.reason, caught.value.message


def test_prepares_a_valid_dataset(write: Callable[[Document], Path], tmp_path: Path) -> None:
    prepared = prepare(write(coco(images=10)), tmp_path)

    assert prepared.image_count == 10
    assert prepared.annotation_count == 10
    assert prepared.instances_per_class == {"dump": 5, "tire": 5}
    assert prepared.train_image_count + prepared.val_image_count == 10
    assert prepared.val_image_count == 2
    train = json.loads(prepared.train_path.read_text())
    val = json.loads(prepared.val_path.read_text())
    split = json.loads(prepared.split_path.read_text())
    assert sorted(i["id"] for i in train["images"]) == split["train"]
    assert sorted(i["id"] for i in val["images"]) == split["val"]
    assert not set(split["train"]) & set(split["val"])
    assert all(Path(i["file_name"]).is_absolute() for i in train["images"] + val["images"])
    assert {a["image_id"] for a in val["annotations"]} <= set(split["val"])


def test_classes_are_ordered_by_category_id(
    write: Callable[[Document], Path], tmp_path: Path
) -> None:
    document = coco(classes=("a", "b", "c"))
    # Listed out of order: the label order must still follow the ids.
    document["categories"] = [
        {"id": 30, "name": "zebra"},
        {"id": 10, "name": "tire"},
        {"id": 20, "name": "dump"},
    ]
    prepared = prepare(write(document), tmp_path)

    assert prepared.classes == ("tire", "dump", "zebra")
    train = json.loads(prepared.train_path.read_text())
    assert train["categories"] == [
        {"id": 1, "name": "tire", "supercategory": ""},
        {"id": 2, "name": "dump", "supercategory": ""},
        {"id": 3, "name": "zebra", "supercategory": ""},
    ]
    val = json.loads(prepared.val_path.read_text())
    by_image = {a["image_id"]: a["category_id"] for a in train["annotations"] + val["annotations"]}
    # Image 3 held category 10 * (1 + 3 % 3) = 10 ("tire"), image 4 held 20 ("dump").
    assert (by_image[3], by_image[4]) == (1, 2)


def test_split_is_deterministic_and_stratified(
    write: Callable[[Document], Path], tmp_path: Path
) -> None:
    document = coco(images=30, classes=("common", "rare"))
    # Only two images carry the rare class.
    for annotation in document["annotations"]:
        annotation["category_id"] = 20 if annotation["image_id"] in (4, 17) else 10
    annotation = write(document)

    first = json.loads(prepare(annotation, tmp_path, seed=7).split_path.read_text())
    again = json.loads(prepare(annotation, tmp_path, seed=7).split_path.read_text())
    other = json.loads(prepare(annotation, tmp_path, seed=8).split_path.read_text())

    assert first == again
    assert first["val"] != other["val"]
    assert len(first["val"]) == 6
    for split in (first, other):
        # The rare class keeps an image in train and, having one to spare, reaches val.
        assert {4, 17} & set(split["train"])
        assert {4, 17} & set(split["val"])


def test_every_class_stays_in_train_even_with_a_large_val_fraction() -> None:
    classes = {1: frozenset({1}), 2: frozenset({2}), 3: frozenset({1}), 4: frozenset({3})}
    for seed in range(20):
        train, val = stratified_split(classes, image_ids=[1, 2, 3, 4], val_fraction=0.5, seed=seed)
        assert {c for i in train for c in classes[i]} == {1, 2, 3}
        assert sorted(train + val) == [1, 2, 3, 4]


def test_fingerprint_changes_with_annotations_and_images(
    write: Callable[[Document], Path], tmp_path: Path
) -> None:
    annotation = write(coco())
    first = prepare(annotation, tmp_path).fingerprint
    assert prepare(annotation, tmp_path).fingerprint == first

    (tmp_path / "data" / "img" / "1.jpg").write_bytes(b"a different image")
    second = prepare(annotation, tmp_path).fingerprint
    assert second != first

    document = coco()
    document["annotations"][0]["bbox"] = [11, 10, 20, 30]
    annotation.write_text(json.dumps(document))
    assert prepare(annotation, tmp_path).fingerprint not in (first, second)


@pytest.mark.parametrize(
    ("mutate", "reason", "needle"),
    [
        (lambda d: d.pop("annotations"), "dataset_invalid", "missing COCO key(s) annotations"),
        (lambda d: d.update(categories=[]), "dataset_invalid", "no categories"),
        (lambda d: d.update(annotations=[]), "dataset_invalid", "no annotations"),
        (
            lambda d: d["annotations"][0].update(image_id=999),
            "dataset_invalid",
            "refer to images that are not in `images`",
        ),
        (
            lambda d: d["annotations"][0].update(category_id=77),
            "dataset_invalid",
            "unknown categories",
        ),
        (
            lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 5]),
            "dataset_invalid",
            "non-positive width or height",
        ),
        (
            lambda d: d["annotations"][0].update(bbox=[90, 10, 20, 5]),
            "dataset_invalid",
            "outside their image",
        ),
        (
            lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]),
            "dataset_invalid",
            "duplicate annotation ids",
        ),
        (lambda d: d["images"][1].update(id=1), "dataset_invalid", "duplicate image ids"),
        (
            lambda d: d["categories"].append({"id": 99, "name": "dump"}),
            "dataset_invalid",
            "names are used twice",
        ),
        (
            lambda d: d["categories"].append({"id": 99, "name": "unused"}),
            "dataset_invalid",
            "have no annotations (unused)",
        ),
        (lambda d: d["images"][0].pop("width"), "dataset_invalid", "positive `width`"),
    ],
)
def test_invalid_datasets_fail_with_a_reason(
    write: Callable[[Document], Path],
    tmp_path: Path,
    mutate: Callable[[Document], Any],
    reason: str,
    needle: str,
) -> None:
    document = coco()
    mutate(document)
    got_reason, message = reason_of(write(document), tmp_path)
    assert (got_reason, needle in message) == (reason, True), message


def test_missing_images_are_named(write: Callable[[Document], Path], tmp_path: Path) -> None:
    annotation = write(coco())
    (tmp_path / "data" / "img" / "3.jpg").unlink()
    reason, message = reason_of(annotation, tmp_path)
    assert reason == "dataset_invalid"
    assert "1 images are missing" in message and "img/3.jpg" in message


def test_unreadable_files(tmp_path: Path) -> None:
    assert reason_of(tmp_path / "nope.json", tmp_path)[0] == "dataset_unreadable"
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    reason, message = reason_of(broken, tmp_path)
    assert reason == "dataset_unreadable" and "not valid JSON" in message
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    assert reason_of(listed, tmp_path)[0] == "dataset_invalid"


def test_locations(tmp_path: Path) -> None:
    assert resolve_location("file:///data/a%20b.json", artifact_root=tmp_path) == Path(
        "/data/a b.json"
    )
    assert resolve_location("/abs/x.json", artifact_root=tmp_path) == Path("/abs/x.json")
    assert (
        resolve_location("datasets/x.json", artifact_root=tmp_path) == tmp_path / "datasets/x.json"
    )
    with pytest.raises(DatasetError) as caught:
        resolve_location("s3://bucket/x.json", artifact_root=tmp_path)
    assert caught.value.reason == "dataset_unreadable"
