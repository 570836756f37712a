"""Small real image files for dataset tests: the worker reads every image's header."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=64)
def encoded(
    width: int,
    height: int,
    *,
    format: str = "PNG",
    mode: str = "RGB",
    noise: int = 0,
    orientation: int = 1,
) -> bytes:
    """An image file's bytes: `noise` seeds random pixels (0: one flat colour)."""
    from PIL import Image

    if noise:
        import numpy as np

        rng = np.random.default_rng(noise)
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
    else:
        image = Image.new(mode, (width, height))
    options: dict[str, Any] = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def write_image(path: Path, width: int, height: int, **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(width, height, **options))
    return path
