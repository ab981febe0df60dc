"""Alert formats made of configuration: `[formats.<name>]` maps contract fields to paths.

A new box vendor needs a table in the config, not code:

    [formats.acme]
    time_format = "%Y-%m-%d %H:%M:%S"
    utc_offset = "+08:00"
    [formats.acme.fields]
    alert_id = "alarm.id"
    box_id = "device.sn"
    camera_id = "alarm.channel"
    event_type = "alarm.type"
    occurred_at = "alarm.time"
    image = "alarm.picture"        # base64; or image_url = "alarm.pictureUrl"
    site = "=plant-north"          # a constant
    [formats.acme.values.event_type]
    "1001" = "fire"
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.config import MappingFormat, Settings, offset_tz
from daemon.contract import parse_rfc3339
from daemon.hookspecs import hookimpl
from daemon.plugin_api import AlertError, IncomingAlert
from plugins.canonical import alert_from_dict, load_json_object

_MISSING = object()
#: zone names `%Z` reads as UTC (strptime accepts them, and returns a naive time)
_UTC_NAMES = ("UTC", "GMT")
#: contract fields that are names: a vendor's number (not a boolean) becomes its text
_NAME_FIELDS = ("alert_id", "box_id", "camera_id", "event_type")


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted path (list items by index), or _MISSING."""
    value = data
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def to_rfc3339(value: Any, time_format: str, utc_offset: str) -> str:
    """A vendor's time as RFC 3339 text."""
    offset = offset_tz(utc_offset)
    if time_format in ("epoch_s", "epoch_ms"):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a number of {time_format}, got {value!r}")
        seconds = float(value) / (1000 if time_format == "epoch_ms" else 1)
        return datetime.fromtimestamp(seconds, UTC).astimezone(offset).isoformat()
    if not isinstance(value, str):
        raise ValueError(f"expected a time string, got {value!r}")
    if time_format == "rfc3339":
        return parse_rfc3339(value, offset).isoformat()
    parsed = datetime.strptime(value, time_format)
    if parsed.tzinfo is None:
        # %Z reads a zone name but leaves the time naive: UTC and GMT are UTC, not the
        # configured offset
        named_utc = "%Z" in time_format and any(name in value for name in _UTC_NAMES)
        parsed = parsed.replace(tzinfo=UTC if named_utc else offset)
    if parsed.utcoffset() % timedelta(minutes=1):
        parsed = parsed.astimezone(UTC)  # %z reads offsets in seconds; RFC 3339's are minutes
    return parsed.isoformat()


def json_text(value: Any) -> str:
    """A JSON value as its JSON text (true, 1001 for 1001.0, "x" as x): the key it is
    looked up by in `values` translations, and a name field's text."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


class MappedFormat:
    def __init__(self, name: str, spec: MappingFormat) -> None:
        self.name = name
        self.spec = spec

    def parse(self, payload: bytes, *, topic: str | None) -> IncomingAlert:
        data = load_json_object(payload)
        canonical: dict[str, Any] = {}
        for field, path in self.spec.fields.items():
            value = path[1:] if path.startswith("=") else lookup(data, path)
            if value is _MISSING:
                continue
            translations = self.spec.values.get(field)
            if translations is not None and not isinstance(value, dict | list):
                value = translations.get(json_text(value), value)
            if field == "occurred_at":
                try:
                    value = to_rfc3339(value, self.spec.time_format, self.spec.utc_offset)
                except (ValueError, OverflowError, OSError) as exc:  # out of datetime's range
                    raise AlertError(f"{path} (occurred_at)", str(exc)) from exc
            elif field in _NAME_FIELDS and isinstance(value, int | float):
                if isinstance(value, bool) or not math.isfinite(value):
                    raise AlertError(f"{path} ({field})", f"expected a name, got {value!r:.40}")
                value = json_text(value)
            canonical[field] = value
        canonical["extra"] = {
            key: value
            for key, path in self.spec.extra.items()
            if (value := lookup(data, path)) is not _MISSING
        }
        try:
            return alert_from_dict(canonical)
        except AlertError as exc:
            raise self._vendor_error(exc) from exc

    def _vendor_error(self, exc: AlertError) -> AlertError:
        """Name the vendor's path next to the contract field."""
        field = exc.field.split("[")[0].split(".")[0]
        path = self.spec.fields.get(field)
        if path is None or path.startswith("="):
            return exc
        return AlertError(f"{path} ({exc.field})", exc.message)


@hookimpl
def register_alert_formats(register, settings: Settings):
    for name, spec in settings.formats.items():
        register(MappedFormat(name, spec))
