"""Image patches for Qwen2-VL-family vision towers, straight from prepared images.

secondlook resizes every snapshot once, to a multiple of the model's patch factor inside the
token budget (daemon.images). For such an image the Hugging Face image processor's resize is
a no-op, and what is left — rescale, normalise, patchify — is one fused multiply-add and a
reshape in torch (multi-threaded, outside the GIL) instead of several float64 numpy passes:
about ten times faster, with the same values within float rounding. Images of any other size
go through the image processor itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


def _pixel_bounds(image_processor: Any) -> tuple[int, int]:
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    low = getattr(image_processor, "min_pixels", None) or get("shortest_edge") or 0
    high = getattr(image_processor, "max_pixels", None) or get("longest_edge") or 1 << 62
    return int(low), int(high)


def fits_as_is(image: Image.Image, image_processor: Any) -> bool:
    """Whether the image processor would leave this image's size unchanged."""
    factor = image_processor.patch_size * image_processor.merge_size
    low, high = _pixel_bounds(image_processor)
    width, height = image.size
    return width % factor == 0 and height % factor == 0 and low <= width * height <= high


def can_patch_directly(images: Sequence[Any], image_processor: Any) -> bool:
    needed = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
    return (
        all(hasattr(image_processor, name) for name in needed)
        and getattr(image_processor, "do_resize", True) is not False
        and all(
            isinstance(image, Image.Image) and fits_as_is(image, image_processor)
            for image in images
        )
    )


def _scale_and_shift(image_processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """x * scale + shift == ((x * rescale_factor) - mean) / std, per channel."""
    rescale = (
        image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
    )
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float64)
        std = torch.tensor(image_processor.image_std, dtype=torch.float64)
    else:
        mean, std = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    scale = (rescale / std).float().view(3, 1, 1)
    shift = (-mean / std).float().view(3, 1, 1)
    return scale, shift


def _normalised(image: Image.Image, image_processor: Any) -> torch.Tensor:
    """(C, H, W) float32, rescaled and normalised."""
    scale, shift = _scale_and_shift(image_processor)
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return torch.addcmul(shift, pixels.float(), scale)


def patch_images(
    images: Sequence[Image.Image], image_processor: Any, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """`pixel_values` (in `dtype`) and `image_grid_thw` for images that fit as they are.

    The layout is the processor's: per image, merge windows of patches in raster order, each
    patch flattened as channels x time (the still frame repeated) x rows x columns. Every
    image is written once, straight into its rows of the batch's tensor.
    """
    patch = image_processor.patch_size
    merge = image_processor.merge_size
    temporal = image_processor.temporal_patch_size
    grids = [[1, image.height // patch, image.width // patch] for image in images]
    total = sum(h * w for _, h, w in grids)
    out = torch.empty(total, 3 * temporal * patch * patch, dtype=dtype)
    offset = 0
    for image, (_, grid_h, grid_w) in zip(images, grids, strict=True):
        pixels = _normalised(image, image_processor)
        windows = pixels.reshape(3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        windows = windows.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(
            5
        )  # (gh, gw, mh, mw, C, 1, ph, pw)
        rows = out[offset : offset + grid_h * grid_w]
        rows.view(*windows.shape[:5], temporal, patch, patch).copy_(
            windows.expand(*windows.shape[:5], temporal, patch, patch)
        )
        offset += grid_h * grid_w
    return {"pixel_values": out, "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}
