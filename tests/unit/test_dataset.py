from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.images import write_image
from trainer_worker.dataset import DatasetError, prepare_dataset, resolve_location
from trainer_worker.splits import stratified_split

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
            if isinstance(image.get("width"), int) and isinstance(image.get("height"), int):
                write_image(tmp_path / "data" / image["file_name"], image["width"], image["height"])
        annotation = tmp_path / "data" / "annotations.json"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        annotation.write_text(json.dumps(document))
        return annotation

    return _write


def prepare(
    annotation: Path,
    tmp_path: Path,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
) -> Any:
    return prepare_dataset(
        annotation_path=annotation,
        image_root=None,
        out_dir=tmp_path / "out",
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


def reason_of(annotation: Path, tmp_path: Path, **options: Any) -> tuple[str, str]:
    with pytest.raises(DatasetError) as caught:
        prepare(annotation, tmp_path, **options)
    return caught.value.reason, caught.value.message


def image_ids(path: Path) -> list[int]:
    return sorted(i["id"] for i in json.loads(path.read_text())["images"])


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
        split = stratified_split(classes, image_ids=[1, 2, 3, 4], val_fraction=0.5, seed=seed)
        assert {c for i in split.train for c in classes[i]} == {1, 2, 3}
        assert sorted(split.train + split.val) == [1, 2, 3, 4]
        assert split.test == []


def rare_and_common(images: int, rare: tuple[int, ...]) -> Document:
    document = coco(images=images, classes=("common", "rare"))
    for annotation in document["annotations"]:
        annotation["category_id"] = 20 if annotation["image_id"] in rare else 10
    return document


def test_seeded_test_split_is_deterministic_and_stratified(
    write: Callable[[Document], Path], tmp_path: Path
) -> None:
    annotation = write(rare_and_common(30, rare=(4, 17, 25)))

    def split_of(seed: int, test_fraction: float) -> dict[str, Any]:
        prepared = prepare(annotation, tmp_path, seed=seed, test_fraction=test_fraction)
        split = json.loads(prepared.split_path.read_text())
        if test_fraction:
            assert prepared.test_path is not None
            assert image_ids(prepared.test_path) == split["test"]
            assert prepared.test_image_count == len(split["test"])
        return split

    first = split_of(7, 0.2)
    assert split_of(7, 0.2) == first
    other = split_of(8, 0.2)
    assert (first["val"], first["test"]) != (other["val"], other["test"])
    assert (first["source"], first["seed"], first["test_fraction"]) == ("seed", 7, 0.2)
    for split in (first, other):
        assert (len(split["val"]), len(split["test"])) == (6, 6)
        assert sorted(split["train"] + split["val"] + split["test"]) == list(range(1, 31))
        # Three images of the rare class: one to each split.
        for name in ("train", "val", "test"):
            assert len({4, 17, 25} & set(split[name])) == 1, (name, split)
    # Adding a test split leaves the validation images of the seed where they were.
    assert split_of(7, 0.0)["val"] == first["val"]
    assert split_of(7, 0.0)["test"] == []


def test_a_test_split_keeps_every_class_in_train() -> None:
    classes = {i: frozenset({i % 3}) for i in range(1, 9)} | {9: frozenset({7})}
    for seed in range(30):
        split = stratified_split(
            classes, image_ids=list(range(1, 10)), val_fraction=0.3, test_fraction=0.3, seed=seed
        )
        assert {c for i in split.train for c in classes[i]} == {0, 1, 2, 7}
        assert sorted(split.train + split.val + split.test) == list(range(1, 10))
        assert split.val and split.test and not set(split.val) & set(split.test)


def test_a_test_split_needs_three_images_and_room_to_train(
    write: Callable[[Document], Path], tmp_path: Path
) -> None:
    two = write(coco(images=2, classes=("dump",)))
    reason, message = reason_of(two, tmp_path, test_fraction=0.2)
    assert reason == "dataset_invalid" and "at least 3 are needed" in message, message
    # Each image holds the only box of its class: none can leave train.
    lonely = write(coco(images=3, classes=("a", "b", "c")))
    reason, message = reason_of(lonely, tmp_path, test_fraction=0.2)
    assert reason == "dataset_invalid" and "no image can be held out for val" in message, message
    reason, message = reason_of(write(coco()), tmp_path, val_fraction=0.5, test_fraction=0.5)
    assert reason == "dataset_invalid" and "test_fraction" in message, message


def with_splits(document: Document, splits: dict[int, str]) -> Document:
    for image in document["images"]:
        if image["id"] in splits:
            image["split"] = splits[image["id"]]
    return document


def test_the_datasets_own_splits_are_used(
    write: Callable[[Document], Path], tmp_path: Path
) -> None:
    splits = {i: "train" for i in range(1, 7)} | {7: "val", 8: "val", 9: "test", 10: "test"}
    annotation = write(with_splits(coco(images=10), splits))

    for seed, val_fraction, test_fraction in ((0, 0.2, 0.0), (5, 0.4, 0.3)):
        prepared = prepare(
            annotation, tmp_path, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
        split = json.loads(prepared.split_path.read_text())
        assert split == {
            "source": "dataset",
            "train": [1, 2, 3, 4, 5, 6],
            "val": [7, 8],
            "test": [9, 10],
        }
        assert prepared.split_source == "dataset"
        assert (
            prepared.train_image_count,
            prepared.val_image_count,
            prepared.test_image_count,
        ) == (6, 2, 2)
        assert image_ids(prepared.train_path) == [1, 2, 3, 4, 5, 6]
        assert image_ids(prepared.val_path) == [7, 8]
        assert prepared.test_path is not None and image_ids(prepared.test_path) == [9, 10]
        test = json.loads(prepared.test_path.read_text())
        assert {a["image_id"] for a in test["annotations"]} == {9, 10}

    no_test = write(with_splits(coco(images=10), {i: "train" if i < 9 else "val" for i in splits}))
    prepared = prepare(no_test, tmp_path, test_fraction=0.3)
    assert (prepared.test_path, prepared.test_image_count) == (None, 0)
    assert prepared.val_image_count == 2


@pytest.mark.parametrize(
    ("splits", "needles"),
    [
        (
            {i: "train" for i in range(1, 10)},
            ["1 images have no `split` key while others have one (10)"],
        ),
        (
            {i: "train" for i in range(1, 9)} | {9: "validation", 10: ["val"]},
            ["2 images name an unknown `split`", "9: 'validation'", "10: ['val']", "'test'"],
        ),
        ({i: "train" if i < 9 else "test" for i in range(1, 11)}, ["put no image in val"]),
        (
            # Even images hold "dump" (category 10): none of them in train.
            {i: "train" if i % 2 else "val" for i in range(1, 11)},
            [
                "1 classes have no annotated image in the dataset's train split (dump)",
                '"split": "train"',
            ],
        ),
    ],
)
def test_the_datasets_own_splits_must_be_whole_and_valid(
    write: Callable[[Document], Path],
    tmp_path: Path,
    splits: dict[int, Any],
    needles: list[str],
) -> None:
    reason, message = reason_of(write(with_splits(coco(images=10), splits)), tmp_path)
    assert reason == "dataset_invalid"
    assert [n for n in needles if n not in message] == [], message


def test_fingerprint_changes_with_annotations_and_images(
    write: Callable[[Document], Path], tmp_path: Path
) -> None:
    annotation = write(coco())
    first = prepare(annotation, tmp_path).fingerprint
    assert prepare(annotation, tmp_path).fingerprint == first

    write_image(tmp_path / "data" / "img" / "1.jpg", 100, 80, noise=1)
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
