"""Snapshot checks and preparation: header checks at intake, one cheap decode for the model."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """A snapshot that cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Check type, size and completeness from the bytes and the header, without decoding.

    Refuses anything but JPEG and PNG, images over `max_pixels` (decompression bombs) and
    files cut short (no JPEG end-of-image marker, no PNG IEND chunk).
    """
    if not data:
        raise ImageError("empty image")
    if data.startswith(JPEG_MAGIC):
        fmt = "jpeg"
    elif data.startswith(PNG_MAGIC):
        fmt = "png"
    else:
        raise ImageError("not a JPEG or PNG image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"unreadable {fmt.upper()} header: {exc}") from exc
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} image has {width * height} pixels, over the limit of {max_pixels}"
        )
    tail = data[-64:].rstrip(b"\x00")
    if fmt == "jpeg" and not tail.endswith(b"\xff\xd9"):
        raise ImageError("truncated JPEG: no end-of-image marker")
    if fmt == "png" and b"IEND" not in tail[-12:]:
        raise ImageError("truncated PNG: no IEND chunk")
    return ImageInfo(fmt, width, height)


def fit_to_budget(width: int, height: int, *, max_pixels: int, factor: int) -> tuple[int, int]:
    """The size, in multiples of `factor`, closest to `width`x`height` within `max_pixels`.

    Keeps the aspect ratio; never goes below one `factor` square per side.
    """
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    new_w = max(factor, round(width * scale / factor) * factor)
    new_h = max(factor, round(height * scale / factor) * factor)
    if new_w * new_h > max_pixels:
        new_w = max(factor, math.floor(width * scale / factor) * factor)
        new_h = max(factor, math.floor(height * scale / factor) * factor)
    return new_w, new_h


def load_for_model(data: bytes, *, max_pixels: int, factor: int) -> Image.Image:
    """Decode once, at reduced scale where JPEG allows, and resize once to the budget."""
    try:
        img = Image.open(io.BytesIO(data))
        target = fit_to_budget(*img.size, max_pixels=max_pixels, factor=factor)
        if img.format == "JPEG":
            img.draft("RGB", target)
        img.load()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise ImageError(f"corrupt image: {exc}") from exc
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != target:
        img = img.resize(target, Image.Resampling.BICUBIC)
    return img
