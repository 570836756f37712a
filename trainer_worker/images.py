"""The image files of a dataset, checked before any training starts.

Every image is read only where the dataset lives: its `file_name`, normalised and with
symlinks resolved, lies inside the image root. Every image is then opened, headers only
(no pixel is decoded), in a thread pool: it is an image in a format the training pipeline
reads, it is whole (a PNG ends with its IEND chunk, a JPEG with its end-of-image marker),
and its size as the pipeline reads it equals the declared `width` and `height`.

The pipeline reads images the way mmdet's `LoadImageFromFile` does by default, with
OpenCV's `imdecode(IMREAD_COLOR)`: every image becomes 8-bit, 3-channel BGR (grayscale is
repeated, alpha dropped, 16 bits scaled to 8), and the EXIF orientation is applied. A
photo whose EXIF orientation turns it by 90 degrees is therefore read with width and height
swapped, and its declared size and boxes must be those of the turned image, as viewers show
it (docs/datasets.md).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trainer_worker.image_headers import NotAnImage, TooLarge, Truncated, read_header

# What OpenCV reads and this module checks; GIF is read only by recent OpenCV releases.
FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
# Larger images are refused (Pillow's decompression-bomb limit): a decoded one would take
# over half a gigabyte in every data-loading process.
MAX_PIXELS = 178_956_970
CHECK_THREADS = 8
# Non-blocking: a FIFO named as an image must not hang the worker.
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
_CHUNK = 512
_EXAMPLES = 3
# EXIF orientations 5 to 8 turn the image by 90 degrees.
_TRANSPOSING = frozenset({5, 6, 7, 8})


@dataclass(slots=True)
class _Findings:
    sizes: dict[str, int] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    not_image: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    too_large: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)

    def merge(self, other: _Findings) -> None:
        self.sizes.update(other.sizes)
        for name in _PROBLEMS:
            getattr(self, name).extend(getattr(other, name))


_PROBLEMS = (
    "outside",
    "missing",
    "empty",
    "not_image",
    "unsupported",
    "truncated",
    "too_large",
    "wrong_size",
)

# The finding of a header that cannot be read; any other error (an OSError): not_image.
_UNREADABLE: dict[type[Exception], str] = {Truncated: "truncated", TooLarge: "too_large"}


class ImageProblems(Exception):
    """What is wrong with a dataset's image files, one sentence per kind of problem."""

    def __init__(self, sentences: Sequence[str]) -> None:
        super().__init__("; ".join(sentences))
        self.sentences = tuple(sentences)


def find_image_root(names: Iterable[str], annotation_path: Path) -> Path:
    """Where the images of an annotation file are when no image_root is set: its own folder,
    or COCO's usual `images/` folder beside it, whichever holds the first image."""
    folder = annotation_path.parent
    first = next(iter(names), None)
    if first is None or os.path.isabs(first):
        return folder
    beside = folder / "images"
    if not os.path.lexists(folder / first) and os.path.lexists(beside / first):
        return beside
    return folder


def check_images(
    images: Mapping[int, tuple[str, float, float]],
    root: Path,
    *,
    threads: int = CHECK_THREADS,
) -> dict[str, int]:
    """File sizes by file name, once every image lies inside `root`, exists, and is an image
    the pipeline reads of its declared size; ImageProblems otherwise."""
    try:
        resolved_root = os.path.realpath(root, strict=True)
    except OSError:
        raise ImageProblems([f"the image root {root} does not exist"]) from None
    if not os.path.isdir(resolved_root):
        raise ImageProblems([f"the image root {root} is not a folder"])
    # One entry per file: two image ids may share a file, each with its declared size.
    entries = sorted({(name, width, height) for name, width, height in images.values()})
    chunks = [entries[i : i + _CHUNK] for i in range(0, len(entries), _CHUNK)]
    checker = _Checker(resolved_root)
    findings = _Findings()
    if len(chunks) <= 1 or threads <= 1:
        for chunk in chunks:
            findings.merge(checker.check(chunk))
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
            for found in pool.map(checker.check, chunks):
                findings.merge(found)
    sentences = _sentences(findings, root)
    if sentences:
        raise ImageProblems(sentences)
    return findings.sizes


class _Checker:
    def __init__(self, root: str) -> None:
        self.root = root
        self.prefix = root.rstrip(os.sep) + os.sep
        # Folders of file names whose real path is inside the root, by relative name.
        self.folders: dict[str, bool] = {"": True}

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.prefix)

    def open(self, name: str, found: _Findings) -> int | None:
        """A file descriptor of `name`, opened once it is known to stay inside the root."""
        if "\0" in name or os.path.isabs(name):
            found.outside.append(name)
            return None
        if ".." in name.split(os.sep):
            # A '..' after a symlink climbs from the link's target: only the resolved
            # path says where it leads.
            return self._open_real(name, os.path.join(self.root, name), found)
        relative = os.path.normpath(name)
        folder, _, _ = relative.rpartition(os.sep)
        known = self.folders.get(folder)
        if known is None:
            known = self.inside(os.path.realpath(os.path.join(self.root, folder)))
            self.folders[folder] = known
        if not known:
            found.outside.append(name)
            return None
        path = os.path.join(self.root, relative)
        try:
            return os.open(path, _OPEN_FLAGS | os.O_NOFOLLOW)
        except OSError as error:
            if error.errno != errno.ELOOP:
                found.missing.append(name)
                return None
        # The file is a symlink.
        return self._open_real(name, path, found)

    def _open_real(self, name: str, path: str, found: _Findings) -> int | None:
        real = os.path.realpath(path)
        if not self.inside(real):
            found.outside.append(name)
            return None
        try:
            return os.open(real, _OPEN_FLAGS)
        except OSError:
            found.missing.append(name)
            return None

    def check(self, entries: Sequence[tuple[str, float, float]]) -> _Findings:
        found = _Findings()
        for name, width, height in entries:
            fd = self.open(name, found)
            if fd is None:
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    found.missing.append(name)
                    continue
                if info.st_size == 0:
                    found.empty.append(name)
                    continue
                header = read_header(fd, info.st_size)
            except (NotAnImage, Truncated, TooLarge, OSError) as error:
                getattr(found, _UNREADABLE.get(type(error), "not_image")).append(name)
                continue
            finally:
                os.close(fd)
            if header.format not in FORMATS:
                found.unsupported.append(f"{name} ({header.format or 'unknown'})")
                continue
            real_width, real_height = header.width, header.height
            turned = header.orientation in _TRANSPOSING
            if turned:
                real_width, real_height = real_height, real_width
            if real_width * real_height > MAX_PIXELS:
                found.too_large.append(name)
            elif (real_width, real_height) != (width, height):
                why = f", EXIF orientation {header.orientation}" if turned else ""
                found.wrong_size.append(
                    f"{name}: declared {_px(width)}x{_px(height)}, "
                    f"read as {real_width}x{real_height}{why}"
                )
            else:
                found.sizes[name] = info.st_size
        return found


def _px(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _sample(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _sentences(found: _Findings, root: Path) -> list[str]:
    allowed = ", ".join(FORMATS)
    kinds = (
        (
            found.outside,
            "images are outside the image root",
            ": a file_name is a relative "
            "path that stays in the dataset's image folder, without symlinks that lead out",
        ),
        (found.missing, f"images are missing under {root}", ": copy them there or set image_root"),
        (found.empty, "image files are empty (0 bytes)", ""),
        (found.not_image, "files are not images that can be read", ""),
        (
            found.unsupported,
            "images are in a format training does not read",
            f" (it reads {allowed})",
        ),
        (found.truncated, "image files are truncated", ": the file ends before the image does"),
        (found.too_large, f"images have more than {MAX_PIXELS:,} pixels", ": tile or shrink them"),
        (
            found.wrong_size,
            "images are not of their declared width and height",
            ": boxes are checked against the declared size",
        ),
    )
    return [
        f"{len(items)} {what} ({_sample(sorted(items))}){hint}"
        for items, what, hint in kinds
        if items
    ]
