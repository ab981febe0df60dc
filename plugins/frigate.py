"""Alert format `frigate`: events of the Frigate NVR, as its MQTT integration publishes them.

Subscribe this format to Frigate's topics (prefix `frigate` by default):

    [[mqtt.subscriptions]]
    topic = "frigate/events"
    format = "frigate"
    [[mqtt.subscriptions]]
    topic = "frigate/+/+/snapshot"
    format = "frigate"

`frigate/<camera>/<label>/snapshot` carries a JPEG of the best frame of the latest object of
that label on that camera; it is kept in memory, not reviewed. `frigate/events` carries
`{"type": "new" | "update" | "end", "before": {...}, "after": {...}}`; the `after` object of a
type listed in `[frigate] review` becomes an alert: id, camera, label, start_time, top_score,
box and zones. Its snapshot is the latest one kept for its camera and label when that arrived
after the event started (else it shows an earlier object), or else Frigate's HTTP API
(`[frigate] api_url` + /api/events/<id>/snapshot.jpg). Message shapes follow
Frigate's MQTT documentation (docs.frigate.video/integrations/mqtt).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from daemon.config import FrigateSettings, Settings, offset_tz
from daemon.hookspecs import hookimpl
from daemon.plugin_api import AlertError, IncomingAlert, RawImage
from plugins.canonical import load_json_object, validate_alert

#: snapshots kept (one per camera and label); the oldest is dropped past this
MAX_SNAPSHOTS = 256
#: a snapshot received this long before its event's start still counts as its own (clocks)
SNAPSHOT_SLACK_S = 2.0


class FrigateFormat:
    name = "frigate"

    def __init__(self, settings: FrigateSettings) -> None:
        self.settings = settings
        #: the latest snapshot per camera and label, with when it arrived (Unix time)
        self._snapshots: dict[tuple[str, str], tuple[float, bytes]] = {}

    def parse(self, payload: bytes, *, topic: str | None) -> IncomingAlert | None:
        levels = (topic or "").split("/")
        if len(levels) >= 4 and levels[-1] == "snapshot":
            self._keep_snapshot(levels[-3], levels[-2], payload)
            return None
        message = load_json_object(payload)
        if message.get("type") not in self.settings.review:
            return None
        event = message.get("after")
        if not isinstance(event, dict):
            raise AlertError("after", "a Frigate event needs an 'after' object")
        return self._alert(event)

    def _keep_snapshot(self, camera: str, label: str, jpeg: bytes) -> None:
        self._snapshots.pop((camera, label), None)
        self._snapshots[(camera, label)] = (time.time(), jpeg)
        while len(self._snapshots) > MAX_SNAPSHOTS:
            self._snapshots.pop(next(iter(self._snapshots)))

    def _alert(self, event: dict[str, Any]) -> IncomingAlert:
        for key in ("id", "camera", "label", "start_time"):
            if key not in event:
                raise AlertError(f"after.{key}", "missing from the Frigate event")
        try:
            started = datetime.fromtimestamp(float(event["start_time"]), UTC).astimezone(
                offset_tz(self.settings.utc_offset)
            )
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            raise AlertError("after.start_time", f"not a Unix time: {exc}") from exc
        score = event.get("top_score") or event.get("score")
        canonical: dict[str, Any] = {
            "alert_id": str(event["id"]),
            "box_id": self.settings.box_id,
            "camera_id": str(event["camera"]),
            "event_type": str(event["label"]),
            "occurred_at": started.isoformat(),
            "score": score,
            "site": self.settings.site,
            "extra": {
                "sub_label": event.get("sub_label"),
                "zones": event.get("entered_zones") or [],
                "frigate_id": event["id"],
            },
        }
        box = event.get("box")
        if isinstance(box, list) and len(box) == 4:
            canonical["boxes"] = [
                dict(zip(("x1", "y1", "x2", "y2"), box, strict=True), label=event["label"])
            ]
        kept = self._snapshots.get((str(event["camera"]), str(event["label"])))
        # one that arrived before the event started shows an earlier object (the topic is
        # retained and holds the latest object of that label on that camera)
        if kept is not None and kept[0] >= started.timestamp() - SNAPSHOT_SLACK_S:
            return IncomingAlert(validate_alert(canonical), [RawImage("image", kept[1])])
        if not self.settings.api_url:
            what = "only one older than the event" if kept is not None else "no snapshot"
            raise AlertError(
                "image",
                f"{what} received for {event['camera']}/{event['label']}, and no "
                "[frigate] api_url to fetch one from",
            )
        api = self.settings.api_url.rstrip("/")
        canonical["image_url"] = f"{api}/api/events/{event['id']}/snapshot.jpg"
        return IncomingAlert(validate_alert(canonical))


@hookimpl
def register_alert_formats(register, settings: Settings):
    register(FrigateFormat(settings.frigate))
