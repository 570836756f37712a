"""The processes of figure 5, one per measurement so that each peak RSS is its own.

    python -m benchmarks.dataset_child generate FOLDER IMAGES BOXES_PER_IMAGE
    python -m benchmarks.dataset_child prepare ANNOTATIONS.json OUT_DIR
    python -m benchmarks.dataset_child json ANNOTATIONS.json

Each prints one JSON line: elapsed seconds and the process's peak RSS in MiB.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

_CLASSES = 10
_WIDTH, _HEIGHT = 640, 480


def generate(folder: Path, images: int, boxes_per_image: int) -> None:
    """A COCO file whose images are real 640x480 files, every other one a PNG, the rest JPEGs:
    hard links to two small files, so that 100,000 images take a few megabytes. Preparation
    opens each one and reads its header and its end, as it does with any dataset."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    sources = _sources(folder)
    path = folder / "annotations.json"
    with path.open("w") as out:
        out.write('{"categories": ')
        json.dump([{"id": c + 1, "name": f"class{c}"} for c in range(_CLASSES)], out)
        out.write(', "images": [')
        for i in range(1, images + 1):
            kind = "png" if i % 2 else "jpg"
            name = f"images/{i:07d}.{kind}"
            os.link(sources[kind], folder / name)
            out.write(
                ("," if i > 1 else "")
                + json.dumps({"id": i, "file_name": name, "width": _WIDTH, "height": _HEIGHT})
            )
        out.write('], "annotations": [')
        ann = 0
        for i in range(1, images + 1):
            for k in range(boxes_per_image):
                ann += 1
                w, h = 20 + (k * 7) % 40, 16 + (k * 11) % 40
                x, y = (i * 37 + k * 53) % (_WIDTH - w), (i * 17 + k * 29) % (_HEIGHT - h)
                out.write(
                    ("," if ann > 1 else "")
                    + json.dumps(
                        {
                            "id": ann,
                            "image_id": i,
                            "category_id": (i + k) % _CLASSES + 1,
                            "bbox": [x, y, w, h],
                            "area": w * h,
                            "iscrowd": 0,
                        }
                    )
                )
        out.write("]}")
    (folder / "complete").write_text(f"{images} {boxes_per_image}\n")


def _sources(folder: Path) -> dict[str, Path]:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (_WIDTH, _HEIGHT), (120, 120, 120))
    ImageDraw.Draw(image).rectangle((100, 80, 300, 240), fill=(200, 40, 40))
    sources = {}
    for kind, format in (("png", "PNG"), ("jpg", "JPEG")):
        buffer = io.BytesIO()
        image.save(buffer, format)
        sources[kind] = folder / f"source.{kind}"
        sources[kind].write_bytes(buffer.getvalue())
    return sources


def main(argv: list[str]) -> None:
    command = argv[1]
    began = time.perf_counter()
    info: dict[str, object] = {}
    if command == "generate":
        generate(Path(argv[2]), int(argv[3]), int(argv[4]))
    elif command == "prepare":
        from shared import catalog
        from trainer_worker.dataset import prepare_dataset

        prepared = prepare_dataset(
            annotation_path=Path(argv[2]),
            image_root=None,
            out_dir=Path(argv[3]),
            val_fraction=catalog.DEFAULT_VAL_FRACTION,
            seed=0,
        )
        info = {"images": prepared.image_count, "annotations": prepared.annotation_count}
    elif command == "json":
        with open(argv[2], "rb") as f:
            document = json.load(f)
        info = {"images": len(document["images"]), "annotations": len(document["annotations"])}
    else:
        raise SystemExit(f"unknown command {command!r}")
    elapsed = time.perf_counter() - began
    peak_mib = _peak_rss_mib()
    print(json.dumps({"elapsed_s": elapsed, "peak_rss_mib": peak_mib, **info}))


def _peak_rss_mib() -> float:
    """VmHWM: unlike ru_maxrss, it starts afresh at exec, not at the parent's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main(sys.argv)
