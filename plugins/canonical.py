"""Alert format: the canonical JSON alert of the public contract."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, ClassVar

import pybase64
import pydantic_core
from pydantic import ValidationError

from daemon.contract import Alert, problem_text, too_many_boxes
from daemon.hookspecs import hookimpl
from daemon.plugin_api import AlertError, IncomingAlert, RawImage


def field_path(loc: tuple[Any, ...]) -> str:
    """('boxes', 0, 'x1') -> 'boxes[0].x1'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "payload"


def decode_base64_image(value: Any, field: str) -> RawImage:
    """Decode a base64 string (a `data:` URL prefix is allowed) into image bytes."""
    if not isinstance(value, str):
        raise AlertError(field, f"expected a base64 string, got {type(value).__name__}")
    text = value
    if value.startswith("data:"):
        _, comma, text = value.partition(",")
        if not comma:
            raise AlertError(field, "a data: URL without a comma before its base64")
    try:
        data = pybase64.b64decode(text, validate=True)  # SIMD: ~40x the standard library
    except (binascii.Error, ValueError):
        # line-wrapped base64 (MIME style) is still base64; else the standard library's
        # error names the fault (padding, a non-base64 character)
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AlertError(field, f"not valid base64: {exc}") from exc
    return RawImage(field, data)


def load_json_object(payload: bytes) -> dict[str, Any]:
    """The payload's JSON object; AlertError says why there is none.

    pydantic-core's parser (several times the standard library's speed on an alert of a
    hundred kilobytes) reads what it can; whatever it refuses (an error, and the few things
    the standard library accepts and it does not: a byte order mark, lone surrogates,
    nesting past 200) goes to the standard library, whose answer or error stands.
    """
    try:
        data = pydantic_core.from_json(payload)
    except ValueError:
        data = _load_json_slowly(payload)
    if not isinstance(data, dict):
        raise AlertError("payload", f"expected a JSON object, got {type(data).__name__}")
    return data


def _load_json_slowly(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise AlertError("payload", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except RecursionError as exc:
        raise AlertError("payload", "not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # a syntax error, or an integer of more than 4300 digits
        raise AlertError("payload", f"not valid JSON: {exc}") from exc


class CanonicalFormat:
    name: ClassVar[str] = "canonical"

    def parse(self, payload: bytes, *, topic: str | None) -> IncomingAlert:
        return alert_from_dict(load_json_object(payload))


def validate_alert(data: dict[str, Any]) -> Alert:
    """The contract's fields of a dict; AlertError names the field at fault."""
    boxes = data.get("boxes")
    if isinstance(boxes, list) and (reason := too_many_boxes(len(boxes))):
        raise AlertError("boxes", reason)  # before validating each of them
    try:
        return Alert.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise AlertError(field_path(first["loc"]), problem_text(first)) from exc


def alert_from_dict(data: dict[str, Any]) -> IncomingAlert:
    """Validate a dict in the canonical shape, images included (base64)."""
    alert = validate_alert(data)
    images = []
    if data.get("image") not in (None, ""):  # "" beside an image_url: no picture of its own
        images.append(decode_base64_image(data["image"], "image"))
    elif not alert.image_url:
        raise AlertError("image", "one of image or image_url is required")
    extra = data.get("images") or []
    if not isinstance(extra, list):
        raise AlertError("images", f"expected a list, got {type(extra).__name__}")
    images += [decode_base64_image(value, f"images[{i}]") for i, value in enumerate(extra)]
    return IncomingAlert(alert, images)


@hookimpl
def register_alert_formats(register):
    register(CanonicalFormat())
