"""What an image file's header says: its format, its stored size and its EXIF orientation,
and whether the file ends the way its format ends. No pixel is decoded.

PNG and JPEG, nearly every dataset's images, are read here (a few small reads per file);
any other file is left to Pillow's `Image.open`, which also reads headers only.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
# Bytes after a JPEG's end-of-image marker that some cameras and editors append.
_JPEG_TRAILER_BYTES = 4096
_FIRST_READ = 4096
# Start-of-frame markers (every coding process), which carry the frame's size.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS = 0xDA
_JPEG_APP1 = 0xE1
_EXIF_ORIENTATION = 0x0112


class NotAnImage(Exception):
    pass


class Truncated(Exception):
    pass


class TooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Header:
    format: str
    width: int
    height: int
    # EXIF orientation, 1 when the image has none.
    orientation: int = 1


def read_header(fd: int, size: int) -> Header:
    """The header of the file open as `fd`, of `size` bytes (more than 0), read from its
    start. NotAnImage, Truncated or TooLarge when there is no header to trust."""
    head = os.read(fd, _FIRST_READ)
    if head.startswith(_PNG_SIGNATURE):
        return _png(fd, head, size)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(fd, head, size)
    with open(fd, "rb", closefd=False) as file:
        file.seek(0)
        return _other(file)


class _Buffer:
    """The file's first bytes, read further on demand."""

    def __init__(self, fd: int, head: bytes) -> None:
        self.fd = fd
        self.data = head

    def need(self, end: int) -> None:
        while len(self.data) < end:
            more = os.read(self.fd, max(_FIRST_READ, end - len(self.data)))
            if not more:
                raise NotAnImage("the header ends early")
            self.data += more


def _tail(fd: int, head: bytes, size: int, count: int) -> bytes:
    if len(head) >= size:
        return head[-count:]
    count = min(count, size)
    return os.pread(fd, count, size - count)


def _png(fd: int, head: bytes, size: int) -> Header:
    buffer = _Buffer(fd, head)
    buffer.need(33)
    data = buffer.data
    if data[12:16] != b"IHDR" or struct.unpack_from(">I", data, 8)[0] != 13:
        raise NotAnImage("no IHDR chunk")
    if zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        raise NotAnImage("a corrupt IHDR chunk")
    width, height = struct.unpack_from(">II", data, 16)
    if not width or not height:
        raise NotAnImage("a zero size")
    orientation = 1
    # Chunks before the pixels: an eXIf chunk there is what decoders apply.
    offset = 33
    while True:
        buffer.need(offset + 8)
        length, kind = struct.unpack_from(">I4s", buffer.data, offset)
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf":
            buffer.need(offset + 8 + length)
            orientation = _exif_orientation(buffer.data[offset + 8 : offset + 8 + length])
        offset += 12 + length
        if offset >= size:
            raise Truncated("the file ends before the pixels")
    if _tail(fd, buffer.data, size, len(_PNG_END)) != _PNG_END:
        raise Truncated("no IEND chunk at the end")
    return Header("PNG", width, height, orientation)


def _jpeg(fd: int, head: bytes, size: int) -> Header:
    buffer = _Buffer(fd, head)
    offset = 2
    orientation = 1
    while True:
        buffer.need(offset + 2)
        data = buffer.data
        if data[offset] != 0xFF:
            raise NotAnImage("a broken marker")
        marker = data[offset + 1]
        if marker == 0xFF:
            # Fill bytes before a marker.
            offset += 1
            continue
        if marker in _JPEG_STANDALONE:
            offset += 2
            continue
        if marker == _JPEG_SOS or marker == 0xD9:
            raise NotAnImage("no frame header before the scan")
        buffer.need(offset + 4)
        length = struct.unpack_from(">H", buffer.data, offset + 2)[0]
        if length < 2:
            raise NotAnImage("a broken segment")
        if marker in _JPEG_FRAMES:
            buffer.need(offset + 9)
            height, width = struct.unpack_from(">HH", buffer.data, offset + 5)
            break
        if marker == _JPEG_APP1:
            buffer.need(offset + 2 + length)
            segment = buffer.data[offset + 4 : offset + 2 + length]
            if segment.startswith(b"Exif\0\0"):
                orientation = _exif_orientation(segment[6:])
        offset += 2 + length
        if offset >= size:
            raise Truncated("the file ends before the frame header")
    if not width or not height:
        raise NotAnImage("a zero size")
    if _JPEG_END not in _tail(fd, buffer.data, size, _JPEG_TRAILER_BYTES):
        raise Truncated("no end-of-image marker at the end")
    return Header("JPEG", width, height, orientation)


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in an EXIF block (a TIFF structure); 1 when absent or broken."""
    if tiff[:4] == b"II*\0":
        order = "<"
    elif tiff[:4] == b"MM\0*":
        order = ">"
    else:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for index in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * index)
            if tag == _EXIF_ORIENTATION and kind == 3:
                orientation: int = struct.unpack_from(order + "H", value)[0]
                return orientation if 1 <= orientation <= 8 else 1
    except struct.error:
        return 1
    return 1


def _other(file: BinaryIO) -> Header:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            orientation = 1
            if "exif" in image.info or image.format == "TIFF":
                try:
                    value = image.getexif().get(_EXIF_ORIENTATION, 1)
                except Exception:  # a broken EXIF block is read as no orientation
                    value = 1
                orientation = value if isinstance(value, int) and 1 <= value <= 8 else 1
            return Header(image.format or "", image.size[0], image.size[1], orientation)
    except Image.DecompressionBombError:
        raise TooLarge("more pixels than Pillow opens") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise NotAnImage("not an image Pillow knows") from None
