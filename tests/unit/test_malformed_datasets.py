"""A battery of datasets that go wrong the way real ones do, each refused by the worker's
preparation (before any training) with its reason; and the images the pipeline reads
that look unusual but train (grayscale, RGBA, 16-bit, EXIF-rotated, ...)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.images import encoded, write_image
from trainer_worker.dataset import DatasetError, PreparedDataset, prepare_dataset

pytest.importorskip("PIL")
pytestmark = pytest.mark.timeout(60)

Document = dict[str, Any]
W, H = 64, 48


def coco(images: int = 4) -> Document:
    return {
        "images": [
            {"id": i, "file_name": f"img/{i}.png", "width": W, "height": H}
            for i in range(1, images + 1)
        ],
        "annotations": [
            {"id": 100 + i, "image_id": i, "category_id": 1 + i % 2, "bbox": [4, 4, 20, 16]}
            for i in range(1, images + 1)
        ],
        "categories": [{"id": 1, "name": "dump"}, {"id": 2, "name": "tire"}],
    }


class Dataset:
    """A valid dataset in `root/data` (images in data/img), and a folder beside it that
    is not part of it (`outside`), holding a real image."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        self.outside = tmp_path / "outside"
        self.document = coco()
        for image in self.document["images"]:
            write_image(self.data / image["file_name"], W, H)
        write_image(self.outside / "secret.png", W, H)

    @property
    def first(self) -> Document:
        image: Document = self.document["images"][0]
        return image

    def image(self, name: str, data: bytes) -> None:
        """The first image becomes `name` holding `data`."""
        (self.data / name).parent.mkdir(parents=True, exist_ok=True)
        (self.data / name).write_bytes(data)
        self.first["file_name"] = name

    def annotation(self) -> Path:
        path = self.data / "annotations.json"
        path.write_text(json.dumps(self.document))
        return path


def prepare(annotation: Path, tmp_path: Path, image_root: Path | None = None) -> PreparedDataset:
    return prepare_dataset(
        annotation_path=annotation,
        image_root=image_root,
        out_dir=tmp_path / "prepared",
        val_fraction=0.25,
        seed=0,
    )


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def fifo(d: Dataset) -> str:
    """A FIFO outside the dataset: opening it would block the test until its timeout."""
    os.mkfifo(d.outside / "pipe.png")
    return "../outside/pipe.png"


def symlinked_file(d: Dataset) -> None:
    (d.data / "img" / "link.png").symlink_to(d.outside / "secret.png")
    d.first["file_name"] = "img/link.png"


def symlinked_folder(d: Dataset) -> None:
    (d.data / "more").symlink_to(d.outside, target_is_directory=True)
    d.first["file_name"] = "more/secret.png"


def link_then_climb(d: Dataset) -> None:
    # Normalised, `deep/../secret.png` stays inside; the OS climbs from the link's target.
    (d.outside / "deeper").mkdir()
    (d.data / "deep").symlink_to(d.outside / "deeper", target_is_directory=True)
    d.first["file_name"] = "deep/../secret.png"


def dangling_symlink(d: Dataset) -> None:
    (d.data / "img" / "gone.png").symlink_to(d.data / "img" / "never-written.png")
    d.first["file_name"] = "img/gone.png"


def set_first(**fields: Any) -> Callable[[Dataset], None]:
    return lambda d: d.first.update(fields)


def set_box(index: int, bbox: Any) -> Callable[[Dataset], None]:
    return lambda d: d.document["annotations"][index].update(bbox=bbox)


def raw_file(text: bytes) -> Callable[[Dataset], Path]:
    def write(d: Dataset) -> Path:
        path = d.data / "annotations.json"
        path.write_bytes(text)
        return path

    return write


# (case, how the dataset goes wrong, the reason, what the message must say)
CASES: list[tuple[str, Callable[[Dataset], Any], str, list[str]]] = [
    # Where images are read from.
    (
        "traversal_to_a_sibling",
        set_first(file_name="../outside/secret.png"),
        "dataset_invalid",
        ["1 images are outside the image root", "../outside/secret.png"],
    ),
    (
        "traversal_to_etc_passwd",
        set_first(file_name="../../../../../../../../etc/passwd"),
        "dataset_invalid",
        ["outside the image root", "etc/passwd"],
    ),
    (
        "absolute_system_file",
        set_first(file_name="/etc/passwd"),
        "dataset_invalid",
        ["outside the image root", "/etc/passwd"],
    ),
    (
        "absolute_real_image",
        lambda d: d.first.update(file_name=str(d.outside / "secret.png")),
        "dataset_invalid",
        ["outside the image root", "secret.png"],
    ),
    (
        "climbs_out_after_normalising",
        set_first(file_name="img/../../outside/secret.png"),
        "dataset_invalid",
        ["outside the image root", "img/../../outside/secret.png"],
    ),
    (
        "symlinked_file_out",
        symlinked_file,
        "dataset_invalid",
        ["outside the image root", "img/link.png"],
    ),
    (
        "symlinked_folder_out",
        symlinked_folder,
        "dataset_invalid",
        ["outside the image root", "more/secret.png"],
    ),
    (
        "symlink_then_dotdot",
        link_then_climb,
        "dataset_invalid",
        ["outside the image root", "deep/../secret.png"],
    ),
    (
        "traversal_to_a_fifo_is_never_opened",
        lambda d: d.first.update(file_name=fifo(d)),
        "dataset_invalid",
        ["outside the image root", "pipe.png"],
    ),
    (
        "nul_in_file_name",
        set_first(file_name="img/1.png\u0000.jpg"),
        "dataset_invalid",
        ["outside the image root"],
    ),
    # The files themselves.
    (
        "missing_image",
        lambda d: (d.data / "img" / "2.png").unlink(),
        "dataset_invalid",
        ["1 images are missing", "img/2.png"],
    ),
    (
        "dangling_symlink",
        dangling_symlink,
        "dataset_invalid",
        ["images are missing", "img/gone.png"],
    ),
    (
        "file_name_is_a_folder",
        set_first(file_name="img"),
        "dataset_invalid",
        ["images are missing", "(img)"],
    ),
    (
        "zero_byte_image",
        lambda d: d.image("img/empty.png", b""),
        "dataset_invalid",
        ["1 image files are empty (0 bytes)", "img/empty.png"],
    ),
    (
        "text_file_named_png",
        lambda d: d.image("img/notes.png", b"these are not pixels\n" * 20),
        "dataset_invalid",
        ["files are not images that can be read", "img/notes.png"],
    ),
    (
        "html_error_page_saved_as_jpeg",
        lambda d: d.image("img/404.jpg", b"<html><body>404 Not Found</body></html>"),
        "dataset_invalid",
        ["not images that can be read", "img/404.jpg"],
    ),
    (
        "png_cut_inside_its_header",
        lambda d: d.image("img/head.png", encoded(W, H)[:20]),
        "dataset_invalid",
        ["not images that can be read", "img/head.png"],
    ),
    (
        "truncated_png",
        lambda d: d.image("img/cut.png", truncated(encoded(W, H, noise=3))),
        "dataset_invalid",
        ["1 image files are truncated", "img/cut.png"],
    ),
    (
        "truncated_jpeg",
        lambda d: d.image("img/cut.jpg", truncated(encoded(W, H, format="JPEG", noise=3))),
        "dataset_invalid",
        ["1 image files are truncated", "img/cut.jpg"],
    ),
    (
        "gif",
        lambda d: d.image("img/anim.gif", encoded(W, H, format="GIF", mode="P")),
        "dataset_invalid",
        ["format training does not read", "img/anim.gif (GIF)", "it reads JPEG, PNG"],
    ),
    (
        "declared_width_wrong",
        set_first(width=W * 2),
        "dataset_invalid",
        ["not of their declared width and height", f"declared {W * 2}x{H}, read as {W}x{H}"],
    ),
    (
        "width_and_height_swapped",
        set_first(width=H, height=W),
        "dataset_invalid",
        [f"img/1.png: declared {H}x{W}, read as {W}x{H}"],
    ),
    (
        "exif_rotated_declared_as_stored",
        lambda d: d.image("img/turned.jpg", encoded(W, H, format="JPEG", orientation=6)),
        "dataset_invalid",
        [f"img/turned.jpg: declared {W}x{H}, read as {H}x{W}, EXIF orientation 6"],
    ),
    (
        "huge_declared_size",
        set_first(width=100_000, height=100_000),
        "dataset_invalid",
        ["images declare more than 178,956,970 pixels", "img/1.png: 100000x100000"],
    ),
    # The annotation file.
    (
        "not_json",
        raw_file(b"\x89PNG this is an image, not annotations"),
        "dataset_unreadable",
        ["is not valid JSON"],
    ),
    (
        "cut_json",
        raw_file(b'{"images": [{"id": 1, "file_na'),
        "dataset_unreadable",
        ["is not valid JSON"],
    ),
    (
        "json_array",
        raw_file(b"[]"),
        "dataset_invalid",
        ["a COCO file is a JSON object, found list"],
    ),
    (
        "images_not_a_list",
        lambda d: d.document.update(images={"1": "img/1.png"}),
        "dataset_invalid",
        ["`images` must be a list"],
    ),
    (
        "empty_images_list",
        lambda d: d.document.update(images=[]),
        "dataset_invalid",
        ["no images: `images` is empty"],
    ),
    (
        "missing_categories_key",
        lambda d: d.document.pop("categories"),
        "dataset_invalid",
        ["missing COCO key(s) categories"],
    ),
    (
        "duplicate_image_ids",
        lambda d: d.document["images"][1].update(id=1),
        "dataset_invalid",
        ["1 duplicate image ids (1)"],
    ),
    (
        "duplicate_annotation_ids",
        lambda d: d.document["annotations"][1].update(id=101),
        "dataset_invalid",
        ["1 duplicate annotation ids (101)"],
    ),
    (
        "image_without_file_name",
        lambda d: d.first.pop("file_name"),
        "dataset_invalid",
        ["1 images lack an integer `id`, a `file_name`", "#0"],
    ),
    (
        "width_as_a_string",
        set_first(width="64"),
        "dataset_invalid",
        ["positive `width`/`height`", "#0"],
    ),
    (
        "negative_height",
        set_first(height=-48),
        "dataset_invalid",
        ["positive `width`/`height`"],
    ),
    (
        "image_id_as_a_string",
        set_first(id="1"),
        "dataset_invalid",
        ["images lack an integer `id`"],
    ),
    (
        "box_outside_the_image",
        set_box(0, [50, 40, 30, 20]),
        "dataset_invalid",
        ["1 boxes lie outside their image", "101: [50, 40, 30, 20] in 64x48"],
    ),
    (
        "negative_box_width",
        set_box(0, [30, 10, -10, 10]),
        "dataset_invalid",
        ["1 boxes have a non-positive width or height", "101: [30, 10, -10, 10]"],
    ),
    (
        "zero_size_box",
        set_box(1, [30, 10, 0, 0]),
        "dataset_invalid",
        ["boxes have a non-positive width or height", "102"],
    ),
    (
        "nan_in_a_box",
        set_box(0, [float("nan"), 10, 10, 10]),
        "dataset_invalid",
        ["annotations lack an integer `id` or a `bbox` of 4 numbers", "#0"],
    ),
    (
        "infinite_box",
        set_box(0, [1, 1, float("inf"), 10]),
        "dataset_invalid",
        ["a `bbox` of 4 numbers"],
    ),
    (
        "box_of_three_numbers",
        set_box(0, [1, 2, 3]),
        "dataset_invalid",
        ["a `bbox` of 4 numbers"],
    ),
    (
        "box_of_strings",
        set_box(0, ["1", "2", "3", "4"]),
        "dataset_invalid",
        ["a `bbox` of 4 numbers"],
    ),
    (
        "box_of_booleans",
        set_box(0, [True, True, True, True]),
        "dataset_invalid",
        ["a `bbox` of 4 numbers"],
    ),
    (
        "unknown_category_id",
        lambda d: d.document["annotations"][0].update(category_id=7),
        "dataset_invalid",
        ["1 annotations refer to unknown categories", "101 -> category 7"],
    ),
    (
        "annotation_of_an_unknown_image",
        lambda d: d.document["annotations"][0].update(image_id=99),
        "dataset_invalid",
        ["annotations refer to images that are not in `images`", "101 -> image 99"],
    ),
    (
        "category_without_a_name",
        lambda d: d.document["categories"][0].pop("name"),
        "dataset_invalid",
        ["categories lack an integer `id` or a non-empty `name`"],
    ),
    (
        "no_annotations",
        lambda d: d.document.update(annotations=[]),
        "dataset_invalid",
        ["no annotations"],
    ),
]


@pytest.mark.parametrize(
    ("make", "reason", "needles"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_a_malformed_dataset_is_refused_with_its_reason(
    tmp_path: Path, make: Callable[[Dataset], Any], reason: str, needles: list[str]
) -> None:
    dataset = Dataset(tmp_path)
    written = make(dataset)
    annotation = written if isinstance(written, Path) else dataset.annotation()
    with pytest.raises(DatasetError) as caught:
        prepare(annotation, tmp_path)
    message = caught.value.message
    assert caught.value.reason == reason, message
    assert [n for n in needles if n not in message] == [], message
    assert not (tmp_path / "prepared" / "train.json").exists(), "nothing to train on is written"
    assert len(message) < 600, message


def test_the_battery_covers_thirty_distinct_ways() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 30


def test_many_bad_images_are_counted_and_a_few_named(tmp_path: Path) -> None:
    dataset = Dataset(tmp_path)
    dataset.document = coco(images=12)
    for image in dataset.document["images"]:
        (dataset.data / image["file_name"]).write_bytes(truncated(encoded(W, H, noise=5)))
    message = ""
    with pytest.raises(DatasetError) as caught:
        prepare(dataset.annotation(), tmp_path)
    message = caught.value.message
    assert message.startswith(
        "12 image files are truncated (img/1.png, img/10.png, img/11.png, ...)"
    )


def test_each_kind_of_problem_is_reported_at_once(tmp_path: Path) -> None:
    dataset = Dataset(tmp_path)
    images = dataset.document["images"]
    images[0]["file_name"] = "../outside/secret.png"
    (dataset.data / "img" / "2.png").write_bytes(b"")
    images[2]["width"] = 30
    with pytest.raises(DatasetError) as caught:
        prepare(dataset.annotation(), tmp_path)
    message = caught.value.message
    for needle in ("1 images are outside", "1 image files are empty", "declared 30x48"):
        assert needle in message, message


ACCEPTED: list[tuple[str, dict[str, Any], tuple[int, int]]] = [
    # As the pipeline reads them: 3 channels of 8 bits (docs/datasets.md).
    ("grayscale.png", {"mode": "L"}, (W, H)),
    ("rgba.png", {"mode": "RGBA"}, (W, H)),
    ("palette.png", {"mode": "P"}, (W, H)),
    ("sixteen_bit.png", {"mode": "I;16"}, (W, H)),
    ("grayscale.jpg", {"format": "JPEG", "mode": "L"}, (W, H)),
    ("cmyk.jpg", {"format": "JPEG", "mode": "CMYK"}, (W, H)),
    ("photo.bmp", {"format": "BMP"}, (W, H)),
    ("photo.tiff", {"format": "TIFF"}, (W, H)),
    ("photo.webp", {"format": "WEBP"}, (W, H)),
    # EXIF orientation 6 turns the stored 64x48 to 48x64, as viewers and OpenCV show it.
    ("turned.jpg", {"format": "JPEG", "orientation": 6}, (H, W)),
    # Orientation 3 turns it upside down: same size.
    ("upside_down.jpg", {"format": "JPEG", "orientation": 3}, (W, H)),
]


@pytest.mark.parametrize(
    ("name", "options", "declared"), ACCEPTED, ids=[case[0] for case in ACCEPTED]
)
def test_images_the_pipeline_reads_are_accepted(
    tmp_path: Path, name: str, options: dict[str, Any], declared: tuple[int, int]
) -> None:
    dataset = Dataset(tmp_path)
    dataset.image(f"img/{name}", encoded(W, H, **options))
    dataset.first.update(width=declared[0], height=declared[1])
    prepared = prepare(dataset.annotation(), tmp_path)
    train = json.loads(prepared.train_path.read_text())
    val = json.loads(prepared.val_path.read_text())
    names = [i["file_name"] for i in train["images"] + val["images"]]
    assert str(dataset.data.resolve() / "img" / name) in names


def test_the_pipeline_decodes_them_as_three_channels(tmp_path: Path) -> None:
    """What training reads: mmcv's imfrombytes, as mmdet's LoadImageFromFile calls it."""
    mmcv = pytest.importorskip("mmcv")
    for name, options, (width, height) in ACCEPTED:
        image = mmcv.imfrombytes(encoded(W, H, **options), flag="color", backend="cv2")
        assert image.shape == (height, width, 3) and str(image.dtype) == "uint8", name


def test_names_that_stay_inside_are_read(tmp_path: Path) -> None:
    dataset = Dataset(tmp_path)
    images = dataset.document["images"]
    (dataset.data / "img" / "alias.png").symlink_to(dataset.data / "img" / "1.png")
    (dataset.data / "same").symlink_to(dataset.data / "img", target_is_directory=True)
    images[0]["file_name"] = "img/alias.png"
    images[1]["file_name"] = "same/2.png"
    images[2]["file_name"] = "img/../img/./3.png"
    jpeg = encoded(W, H, format="JPEG", noise=2)
    # Bytes after the end-of-image marker, as some cameras write them.
    dataset.image("img/trailer.jpg", jpeg + b"\0" * 100)
    images[0]["file_name"] = "img/trailer.jpg"
    prepared = prepare(dataset.annotation(), tmp_path)
    assert prepared.image_count == 4


def test_cocos_images_folder_is_found_without_an_image_root(tmp_path: Path) -> None:
    """file_name relative to `images/` beside the annotation file."""
    document = coco()
    for image in document["images"]:
        image["file_name"] = f"{image['id']}.png"
        write_image(tmp_path / "set" / "images" / image["file_name"], W, H)
    annotation = tmp_path / "set" / "annotations.json"
    annotation.write_text(json.dumps(document))
    prepared = prepare(annotation, tmp_path)
    assert prepared.image_root == tmp_path / "set" / "images"
    train = json.loads(prepared.train_path.read_text())
    assert all(
        Path(i["file_name"]).parent == (tmp_path / "set" / "images").resolve()
        for i in train["images"]
    )
    # An explicit root wins; there, the names are missing.
    with pytest.raises(DatasetError) as caught:
        prepare(annotation, tmp_path, image_root=tmp_path / "set")
    assert "4 images are missing" in caught.value.message
