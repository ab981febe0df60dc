"""An alert's snapshots for the model: checked at intake, fetched if by URL, decoded once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
from PIL.Image import Image

from daemon.config import ImageSettings
from daemon.images import ImageError, inspect_image, load_for_model
from daemon.plugin_api import AlertError, RawImage


def check_raw_image(image: RawImage, settings: ImageSettings) -> None:
    """Intake check of one snapshot; AlertError names the payload field."""
    limit = int(settings.max_bytes_mb * 1024 * 1024)
    if len(image.data) > limit:
        raise AlertError(image.source, f"{len(image.data)} bytes, over the limit of {limit}")
    try:
        inspect_image(image.data, max_pixels=settings.max_input_pixels)
    except ImageError as exc:
        raise AlertError(image.source, str(exc)) from exc


def check_image_url(url: str, settings: ImageSettings) -> None:
    """Only http(s) URLs on an allowed host may be fetched."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AlertError("image_url", "expected an http(s) URL")
    if parts.hostname not in settings.url_hosts:
        raise AlertError(
            "image_url", f"host {parts.hostname!r} is not in the allowed hosts ([images] url_hosts)"
        )


class SnapshotLoader:
    """Turns stored snapshot bytes (or an allowed URL) into model-ready images."""

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> RawImage:
        """GET an allowed URL: no redirects, a timeout and a size cap."""
        check_image_url(url, self.settings)
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.settings.url_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        limit = int(self.settings.max_bytes_mb * 1024 * 1024)
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ImageError(f"image_url answered HTTP {response.status}")
                data = await response.content.read(limit + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ImageError(
                f"image_url could not be fetched: {exc or type(exc).__name__}"
            ) from exc
        if len(data) > limit:
            raise ImageError(f"image_url body is over the limit of {limit} bytes")
        image = RawImage("image_url", data)
        try:
            check_raw_image(image, self.settings)
        except AlertError as exc:
            raise ImageError(str(exc)) from exc
        return image

    async def prepare(
        self, images: Sequence[RawImage], image_url: str | None, *, max_pixels: int, factor: int
    ) -> list[Image]:
        """Decode every snapshot off the event loop, scaled to the token budget."""
        raw = list(images)
        if image_url and not any(image.source == "image" for image in raw):
            raw.insert(0, await self.fetch(image_url))
        if not raw:
            raise ImageError("the alert has no snapshot")
        return await asyncio.to_thread(
            lambda: [load_for_model(i.data, max_pixels=max_pixels, factor=factor) for i in raw]
        )
