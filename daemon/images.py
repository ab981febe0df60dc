"""Snapshot checks and preparation: header checks at intake, one cheap decode for the model."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageDraw, UnidentifiedImageError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the only decoders Pillow may use (else bytes that start like a JPEG but that its JPEG
#: decoder refuses are offered to others: PCD, TGA ...); MPO is a JPEG with more frames
FORMATS = ("JPEG", "PNG")
#: an image's end marker may be followed by up to this many bytes (padding, a trailer)
TRAILER_BYTES = 1024


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
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice its limit
        raise ImageError(
            f"refused as a decompression bomb: more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} "
            f"pixels, over the limit of {max_pixels}"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"unreadable {fmt.upper()} header: {_reason(exc)}") from exc
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} image has {width * height} pixels, over the limit of {max_pixels}"
        )
    tail = data[-TRAILER_BYTES:]
    # in a JPEG's image data an 0xFF byte is always stuffed, never followed by 0xD9
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        raise ImageError(
            f"truncated JPEG: no end-of-image marker in its last {TRAILER_BYTES} bytes"
        )
    end = tail.rfind(b"IEND")
    if fmt == "png" and (end < 0 or len(tail) - end < 8):  # the chunk's CRC follows its name
        raise ImageError(f"truncated PNG: no IEND chunk in its last {TRAILER_BYTES} bytes")
    return ImageInfo(fmt, width, height)


def _reason(exc: Exception) -> str:
    """Pillow's message, without the repr of the buffer it read from."""
    if isinstance(exc, UnidentifiedImageError):
        return "Pillow cannot identify the image"
    return str(exc)


def fit_to_budget(width: int, height: int, *, max_pixels: int, factor: int) -> tuple[int, int]:
    """The size, in multiples of `factor`, closest to `width`x`height` within `max_pixels`.

    Keeps the aspect ratio; never goes below one `factor` square per side (a side held
    there makes the other give way, so that the budget holds for any shape).
    """
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    new_w = max(factor, round(width * scale / factor) * factor)
    new_h = max(factor, round(height * scale / factor) * factor)
    if new_w * new_h > max_pixels:
        new_w = max(factor, math.floor(width * scale / factor) * factor)
        new_h = max(factor, math.floor(height * scale / factor) * factor)
    longest = max(factor, max_pixels // factor // factor * factor)  # beside one factor
    return min(new_w, longest), min(new_h, longest)


Resample = Literal["fast", "bicubic"]
#: set in an image's `info` by `decode` when the JPEG decoder already scaled it down
DRAFT_SCALED = "secondlook_draft_scaled"
#: set in an image's `info` by `decode`: the snapshot's own (width, height); resizes keep it
SOURCE_SIZE = "secondlook_source_size"


@dataclass(frozen=True)
class Budget:
    """How big an image the model sees: at most `max_pixels`, sides in multiples of `factor`.

    `resample = "fast"` uses a nearest-neighbour resize when the step is mild: after a JPEG
    draft decode (a DCT-domain downscale that already low-passed) down to half the size,
    otherwise down to three quarters; stronger steps, and "bicubic", resample bicubically.
    Measured on 640x360, 1280x720 and 1920x1080 snapshots: 35-38 dB PSNR against a
    full-resolution Lanczos resize for "fast", 42-50 dB for "bicubic", at about 0.3-1 ms
    against 8-14 ms per image on a 2.5 GHz Xeon core.
    """

    max_pixels: int
    factor: int
    resample: Resample = "fast"

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        return fit_to_budget(width, height, max_pixels=self.max_pixels, factor=self.factor)


#: how to turn a picture upright, by its EXIF Orientation (2-8; 1 is upright already)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag, 1 (upright) where there is none or it cannot be read."""
    if "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # an unreadable EXIF block leaves the picture as it is stored
        return 1
    return value if value in UPRIGHT else 1


def decode(data: bytes, *, budget: Budget | None = None) -> Image.Image:
    """Decode to RGB, upright as the EXIF Orientation tag says (as browsers show it; box
    coordinates refer to the upright picture). With a budget, a JPEG decodes straight at the
    smallest scale (1/2, 1/4, 1/8) that still covers the budget's size (draft mode)."""
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        stored = img.size
        turn = orientation(img)
        sideways = turn >= 5  # turned a quarter: width and height swap
        upright = stored[::-1] if sideways else stored
        if budget is not None and img.format in ("JPEG", "MPO"):
            target = budget.size_for(*upright)
            img.draft("RGB", target[::-1] if sideways else target)
        img.load()
        scaled = img.size != stored
        if turn != 1:
            img = img.transpose(UPRIGHT[turn])
        img.info[DRAFT_SCALED] = scaled
        img.info[SOURCE_SIZE] = upright
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise ImageError(f"corrupt image: {_reason(exc)}") from exc
    if img.mode != "RGB" or "transparency" in img.info:
        ours = {key: img.info[key] for key in (DRAFT_SCALED, SOURCE_SIZE)}
        img = _as_rgb(img)
        img.info.update(ours)
    return img


def _as_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit grey scaled to 8 bits (Pillow would clip it all to white),
    transparent pixels white (Pillow would show what they hide; white as Qwen-VL's own
    preprocessing and transformers' `convert_to_rgb` lay them)."""
    if img.mode.startswith("I"):
        raw = np.asarray(img, dtype=np.uint32)
        grey = Image.fromarray(np.minimum(raw >> 8, 255).astype(np.uint8), "L")
        if isinstance(key := img.info.get("transparency"), int):  # a PNG's transparent grey
            grey.putalpha(Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), "L"))
        img = grey
    # a PNG's transparent colour (tRNS) too: Pillow makes the alpha of it for L, RGB and P
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def to_budget(
    img: Image.Image, budget: Budget, source: tuple[int, int] | None = None
) -> Image.Image:
    """Resize once to the budget of a `source` size (default: the image's own; a draft
    decode's size rounds otherwise), a no-op when already there. After a draft decode
    (which already filtered) a mild last step uses the fast filter if the budget says so."""
    target = budget.size_for(*(source or img.size))
    if img.size == target:
        return img
    ratio = min(target[0] / img.width, target[1] / img.height)
    # after a draft decode (which low-passed) up to a halving is mild; without one, a quarter
    mild = ratio >= (0.5 if img.info.get(DRAFT_SCALED, False) else 0.75)
    fast = budget.resample == "fast" and mild
    return img.resize(target, Image.Resampling.NEAREST if fast else Image.Resampling.BICUBIC)


def load_for_model(data: bytes, budget: Budget) -> Image.Image:
    """Decode once, at reduced scale where JPEG allows, and resize once to the budget of
    the snapshot's own size."""
    img = decode(data, budget=budget)
    return to_budget(img, budget, img.info[SOURCE_SIZE])


Region = tuple[float, float, float, float]


#: a crop is at least this many pixels per side (where the image has them): a tiny or
#: zero-area detection still shows the model its surroundings
MIN_CROP = 32


def boxes_inside(size: tuple[int, int], boxes: list[Region]) -> list[Region]:
    """The boxes that reach into an image of `size` (one on its edge too); ImageError when
    none does (a box's coordinates of another picture, or wrong)."""
    width, height = size
    inside = [b for b in boxes if b[2] >= 0 and b[3] >= 0 and b[0] <= width and b[1] <= height]
    if boxes and not inside:
        x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        raise ImageError(
            f"the detection boxes ({x1:g},{y1:g})-({x2:g},{y2:g}) lie outside the "
            f"{width}x{height} image"
        )
    return inside


def crop_region(size: tuple[int, int], boxes: list[Region], margin: float) -> tuple[int, ...]:
    """The union of the boxes that reach into the image (one stray box off it does not make
    the crop the whole frame), grown by `margin` of its size on each side (to MIN_CROP
    pixels at least), inside the image."""
    width, height = size
    inside = boxes_inside(size, boxes)
    x1 = min(b[0] for b in inside)
    y1 = min(b[1] for b in inside)
    x2 = max(b[2] for b in inside)
    y2 = max(b[3] for b in inside)
    if width < 2 or height < 2:
        raise ImageError(f"a {width}x{height} image is too small to crop")
    left, right = _grown(x1, x2, margin, width)
    top, bottom = _grown(y1, y2, margin, height)
    return left, top, right, bottom


def on_grid(region: tuple[int, ...], size: tuple[int, int], factor: int) -> tuple[int, ...]:
    """A crop region widened to whole `factor` squares (as far as the image allows), so that
    a crop within the budget needs no resize: rounding each side on its own would stretch a
    small crop (42x38 pixels would become 56x28)."""
    left, top, right, bottom = region
    left, right = _to_multiple(left, right, factor, size[0])
    top, bottom = _to_multiple(top, bottom, factor, size[1])
    return left, top, right, bottom


def _to_multiple(low: int, high: int, factor: int, limit: int) -> tuple[int, int]:
    want = min(limit, -(-(high - low) // factor) * factor)
    low = max(0, min(low - (want - (high - low)) // 2, limit - want))
    return low, low + want


def _grown(low: float, high: float, margin: float, limit: int) -> tuple[int, int]:
    """[low, high] grown by `margin` of its length on each side, to MIN_CROP at least,
    within [0, limit]."""
    grow = max(high - low, 1) * margin
    low, high = max(0.0, low - grow), min(float(limit), high + grow)
    if (short := min(MIN_CROP, limit) - (high - low)) > 0:
        low = max(0.0, low - short / 2)
        high = min(float(limit), low + min(MIN_CROP, limit))
        low = max(0.0, high - min(MIN_CROP, limit))
    return int(low), int(high + 0.5)


def draw_detections(img: Image.Image, boxes: list[Region], source: tuple[int, int]) -> Image.Image:
    """A copy with each box outlined in red, around it (a small detection stays in sight),
    or just inside the image's edge where the box reaches it (a box the size of the frame is
    outlined too); `source` is the size of the image the boxes' pixels are of. Boxes are
    clipped to just outside the image first (a huge one would take the drawing long)."""
    marked = img.copy()
    draw = ImageDraw.Draw(marked)
    width = max(2, round(min(img.size) / 150))
    sx, sy = img.width / source[0], img.height / source[1]
    low, x_max, y_max = -2 * width, img.width + 2 * width, img.height + 2 * width
    for x1, y1, x2, y2 in boxes:
        # whole pixels: the lines keep off the pixels the box's edges fall in
        left, top = _clamped(x1 * sx, low, x_max), _clamped(y1 * sy, low, y_max)
        right, bottom = _clamped(x2 * sx, low, x_max), _clamped(y2 * sy, low, y_max)
        outline = [
            math.floor(left) - width,
            math.floor(top) - width,
            math.ceil(right) + width - 1,
            math.ceil(bottom) + width - 1,
        ]
        if right > 0 and bottom > 0 and left < img.width and top < img.height:
            outline = [
                max(0, outline[0]),
                max(0, outline[1]),
                min(img.width - 1, outline[2]),
                min(img.height - 1, outline[3]),
            ]
        draw.rectangle(outline, outline=(255, 0, 0), width=width)
    return marked


def _clamped(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)
