"""An alert's snapshots for the model: checked at intake, fetched if by URL, decoded once."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
from PIL.Image import Image
from yarl import URL

from daemon.config import ImageSettings
from daemon.images import (
    SOURCE_SIZE,
    Budget,
    ImageError,
    Region,
    boxes_inside,
    crop_region,
    decode,
    draw_detections,
    inspect_image,
    load_for_model,
    on_grid,
    to_budget,
)
from daemon.plugin_api import AlertError, RawImage
from daemon.rule_file import ImageMode
from daemon.url_guard import GuardedResolver, Refused, literal_address, refusal


def check_raw_image(image: RawImage, settings: ImageSettings) -> None:
    """Intake check of one snapshot; AlertError names the payload field."""
    limit = int(settings.max_bytes_mb * 1024 * 1024)
    if len(image.data) > limit:
        raise AlertError(image.source, f"{len(image.data)} bytes, over the limit of {limit}")
    try:
        inspect_image(image.data, max_pixels=settings.max_input_pixels)
    except ImageError as exc:
        raise AlertError(image.source, str(exc)) from exc


def has_own_frame(images: Sequence[RawImage]) -> bool:
    """Whether an alert came with its frame (`image`); else the one behind its `image_url`
    is fetched at review."""
    return any(image.source == "image" for image in images)


def check_image_url(url: str, settings: ImageSettings) -> None:
    """Only http(s) URLs on an allowed host may be fetched, and never from a link-local,
    unspecified, multicast or reserved address (see daemon.url_guard)."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        URL(url)  # as the fetch will read it: a port past 65535, a backslash before the host
    except ValueError as exc:  # "http://[::1", a host that NFKC makes a "#" of …
        raise AlertError("image_url", f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise AlertError("image_url", "expected an http(s) URL")
    if hostname.rstrip(".") not in settings.url_hosts:
        raise AlertError(
            "image_url", f"host {hostname!r} is not in the allowed hosts ([images] url_hosts)"
        )
    literal = literal_address(hostname)
    if literal is not None and (reason := refusal(literal, loopback_allowed=True)):
        raise AlertError("image_url", f"{reason} address {literal} is never fetched from")


def _fetch_failure(exc: BaseException) -> str:
    """Why a fetch failed: the guard's refusal where the connector wrapped it, else the
    error's text or, for a bare timeout, its kind."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, Refused):
        return str(exc.os_error)
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError) and not str(exc):
        return "timed out ([images] url_timeout_s)"
    return str(exc) or type(exc).__name__


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
        try:
            check_image_url(url, self.settings)  # again: [images] may have changed since
        except AlertError as exc:
            raise ImageError(f"image_url: {exc.message}") from None
        if self._session is None:
            # names are checked again at connection time, against what they resolve to
            connector = aiohttp.TCPConnector(resolver=GuardedResolver())
            self._session = aiohttp.ClientSession(connector=connector)
        limit = int(self.settings.max_bytes_mb * 1024 * 1024)
        # the settings of the moment: [images] is reloaded live
        timeout = aiohttp.ClientTimeout(total=self.settings.url_timeout_s)
        data = bytearray()
        try:
            async with self._session.get(url, allow_redirects=False, timeout=timeout) as response:
                if response.status != 200:
                    raise ImageError(f"image_url answered HTTP {response.status}")
                async for chunk in response.content.iter_any():  # to the end, or past the limit
                    data += chunk
                    if len(data) > limit:
                        break
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ImageError(f"image_url could not be fetched: {_fetch_failure(exc)}") from exc
        if len(data) > limit:
            raise ImageError(f"image_url body is over the limit of {limit} bytes")
        image = RawImage("image_url", bytes(data))
        try:
            check_raw_image(image, self.settings)
        except AlertError as exc:
            raise ImageError(str(exc)) from exc
        return image

    async def collect(self, images: Sequence[RawImage], image_url: str | None) -> list[RawImage]:
        """The alert's snapshots, the one behind `image_url` fetched first if needed."""
        raw = list(images)
        if image_url and not has_own_frame(raw):
            raw.insert(0, await self.fetch(image_url))
        if not raw:
            raise ImageError("the alert has no snapshot")
        return raw


class SnapshotSet:
    """One alert's snapshots, each decoded at most once, prepared per rule's image mode.

    The first snapshot is the frame the boxes refer to; the others (`images`) follow it, each
    scaled to the budget. Methods decode and resize: call them off the event loop.
    """

    def __init__(self, raw: Sequence[RawImage], boxes: Sequence[Region], budget: Budget) -> None:
        self.raw = raw
        self.boxes = list(boxes)
        self.budget = budget
        self._frame: Image | None = None
        self._full: Image | None = None
        self._extras: list[Image] | None = None

    def for_rule(self, mode: ImageMode, margin: float) -> list[Image]:
        if mode == "crop+frame" and not self.boxes:
            # nothing to crop: the frame stands for the crop too, so that the pictures the
            # prompt names ("the second ...") and the extra frames after them keep their places
            first = [self.frame(), self.frame()]
        elif mode == "frame" or (mode != "boxes" and not self.boxes):
            first = [self.frame()]  # nothing to crop: the whole frame
        elif mode == "boxes":
            first = [self.marked()]
        elif mode == "crop":
            first = [self.crop(margin)]
        else:  # crop+frame
            first = [self.crop(margin), self.frame()]
        return first + self.extras()

    def frame(self) -> Image:
        if self._frame is None:
            if self._full is not None:
                self._frame = to_budget(self._full, self.budget)
            else:
                self._frame = load_for_model(self.raw[0].data, self.budget)
        return self._frame

    def full(self) -> Image:
        if self._full is None:
            self._full = decode(self.raw[0].data)
        return self._full

    def crop(self, margin: float) -> Image:
        full = self.full()
        region = crop_region(full.size, self.boxes, margin)
        if (region[2] - region[0]) * (region[3] - region[1]) <= self.budget.max_pixels:
            region = on_grid(region, full.size, self.budget.factor)
        return to_budget(full.crop(region), self.budget)

    def marked(self) -> Image:
        frame = self.frame()
        source = frame.info[SOURCE_SIZE]
        boxes_inside(source, self.boxes)  # none to outline: said, as for a crop
        return draw_detections(frame, self.boxes, source)

    def extras(self) -> list[Image]:
        if self._extras is None:
            self._extras = [load_for_model(image.data, self.budget) for image in self.raw[1:]]
        return self._extras
