"""Alert format `frigate`: events of the Frigate NVR, as its MQTT integration publishes them.

Subscribe this format to Frigate's topics (prefix `frigate` by default):

    [[mqtt.subscriptions]]
    topic = "frigate/events"
    format = "frigate"
    [[mqtt.subscriptions]]
    topic = "frigate/+/+/snapshot"
    format = "frigate"

`frigate/<camera>/<label>/snapshot` carries a JPEG of the best frame of the latest object of
that label on that camera (by default cropped to the object, with its box drawn); a JPEG or
PNG is kept in memory (MAX_SNAPSHOT_BYTES in all), and checked like any snapshot, with the
`[images]` settings of the moment, once an alert uses it. `frigate/events` carries
`{"type": "new" | "update" | "end", "before": {...}, "after": {...}}`; the `after` object of a
type listed in `[frigate] review` becomes an alert: id, camera, label, start_time, top_score
and zones. Its snapshot is the latest one kept for its camera and label when that arrived
after the event's first message of any type (less SNAPSHOT_SLACK_S; an earlier one shows
an earlier object), or else Frigate's HTTP API (`[frigate] api_url` + /api/events/<id>/snapshot.jpg,
the whole frame: the alert then carries the detection box too). Without an API, an event
whose snapshot has not come yet (Frigate publishes the event first) waits for it: the
snapshot's message, or the event's next one, brings the alert in; its `end` without one is
refused. An event whose first message here is of a later type than one reviewed (it began
before a restart, which may have caught it waiting) is reviewed at that message, with a
snapshot received since the start; the journal drops it if it was taken in before. A
retained snapshot (the broker sends it at subscribing, at every reconnect on MQTT 3.1.1) shows
an object of before: it is never taken as an event's own. Message
shapes follow Frigate's MQTT documentation
(docs.frigate.video/integrations/mqtt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import structlog

from daemon.config import FrigateSettings, Settings, offset_tz
from daemon.hookspecs import hookimpl
from daemon.images import JPEG_MAGIC, PNG_MAGIC
from daemon.plugin_api import AlertError, IncomingAlert, RawImage, message_retained
from plugins.canonical import load_json_object, validate_alert

#: snapshots kept (one per camera and label); the oldest is dropped past this
MAX_SNAPSHOTS = 256
#: ... and past this many bytes in all
MAX_SNAPSHOT_BYTES = 128 * 2**20
#: a snapshot received this long before its event's first message still counts as its own
SNAPSHOT_SLACK_S = 2.0
#: events waiting for their snapshot, at most (the oldest is dropped past this)
MAX_WAITING = 256
#: events whose first message's arrival is remembered, at most
MAX_SEEN = 4096
#: in the order Frigate sends them
EVENT_TYPES = ("new", "update", "end")

log = structlog.get_logger(__name__)


class FrigateFormat:
    name = "frigate"

    def __init__(self, settings: FrigateSettings) -> None:
        self.settings = settings
        #: when messages arrive (Unix time)
        self.clock: Callable[[], float] = time.time
        #: the latest snapshot per camera and label, with when it arrived (Unix time)
        self._snapshots: dict[tuple[str, str], tuple[float, bytes]] = {}
        #: events of a reviewed type still without a snapshot, by id
        self._waiting: dict[str, dict[str, Any]] = {}
        #: when each recent event's first message (of any type) arrived
        self._first_seen: dict[str, float] = {}
        #: when the first message of all arrived
        self._since: float | None = None

    def parse(self, payload: bytes, *, topic: str | None) -> IncomingAlert | None:
        if self._since is None:
            self._since = self.clock()
        levels = (topic or "").split("/")
        if len(levels) >= 4 and levels[-1] == "snapshot":
            return self._snapshot(levels[-3], levels[-2], payload)
        message = load_json_object(payload)
        kind = message.get("type")
        if kind not in EVENT_TYPES:
            raise AlertError(
                "type", f"expected a Frigate event type (new, update, end), got {kind!r:.40}"
            )
        event = message.get("after")
        if not isinstance(event, dict):
            raise AlertError("after", "a Frigate event needs an 'after' object")
        event_id = str(event.get("id"))
        known = event_id in self._first_seen
        first_seen = self._seen(event_id, ended=kind == "end")
        waiting = self._waiting.pop(event_id, None)
        caught_up = False
        if waiting is None and kind not in self.settings.review:
            if known or not self._missed_review(kind):
                return None
            # begun before the start: its reviewed message may have waited when the daemon
            # stopped; a snapshot received since the start is taken as its own
            caught_up = True
            first_seen = self._since or first_seen
            if event_id in self._first_seen:
                self._first_seen[event_id] = first_seen
        incoming = self._alert(event, first_seen)
        if incoming is not None:
            return incoming
        if kind == "end" and caught_up:
            log.info("frigate event seen first at its end, without a snapshot", frigate_id=event_id)
            return None
        if kind == "end":
            raise AlertError(
                "image",
                f"no snapshot received for {event['camera']}/{event['label']} before the event "
                "ended, and no [frigate] api_url to fetch one from",
            )
        self._waiting[event_id] = event
        while len(self._waiting) > MAX_WAITING:
            dropped = self._waiting.pop(next(iter(self._waiting)))
            log.warning(
                "frigate event dropped: waited too long for its snapshot",
                frigate_id=dropped.get("id"),
            )
        return None  # waits for its snapshot

    def _missed_review(self, kind: str) -> bool:
        """Whether an event's first message here comes after a type that is reviewed."""
        return any(
            earlier in self.settings.review for earlier in EVENT_TYPES[: EVENT_TYPES.index(kind)]
        )

    def _seen(self, event_id: str, *, ended: bool) -> float:
        """When the event's first message arrived (now, for its first); forgotten at its end."""
        first = self._first_seen.pop(event_id, None) or self.clock()
        if not ended:
            self._first_seen[event_id] = first
            while len(self._first_seen) > MAX_SEEN:
                self._first_seen.pop(next(iter(self._first_seen)))
        return first

    def _snapshot(self, camera: str, label: str, jpeg: bytes) -> IncomingAlert | None:
        """Keep a snapshot; the event that waited for it, if any, comes in with it."""
        if not jpeg.startswith((JPEG_MAGIC, PNG_MAGIC)):
            raise AlertError("image", "not a JPEG or PNG image")
        if len(jpeg) > MAX_SNAPSHOT_BYTES:
            raise AlertError("image", f"{len(jpeg)} bytes, over {MAX_SNAPSHOT_BYTES} kept at most")
        self._snapshots.pop((camera, label), None)
        # a retained one (sent at subscribing) shows an object of before: never an event's own
        retained = message_retained()
        self._snapshots[(camera, label)] = (0.0 if retained else self.clock(), jpeg)
        while len(self._snapshots) > MAX_SNAPSHOTS or (
            len(self._snapshots) > 1
            and sum(len(kept) for _, kept in self._snapshots.values()) > MAX_SNAPSHOT_BYTES
        ):
            self._snapshots.pop(next(iter(self._snapshots)))
        waiting = [] if retained else list(self._waiting.items())
        for event_id, event in waiting:
            if (str(event.get("camera")), str(event.get("label"))) == (camera, label):
                del self._waiting[event_id]
                # the snapshot just kept came after the event's first message: it is its own
                return self._alert(event, self._first_seen.get(event_id, 0.0))
        return None

    def _alert(self, event: dict[str, Any], first_seen: float) -> IncomingAlert | None:
        """The event's alert with its snapshot (or its API URL); None while it has none."""
        for key in ("id", "camera", "label", "start_time"):
            if key not in event:
                raise AlertError(f"after.{key}", "missing from the Frigate event")
        start_time = event["start_time"]
        if isinstance(start_time, bool):
            raise AlertError("after.start_time", f"not a Unix time: {start_time!r}")
        try:
            started = datetime.fromtimestamp(float(start_time), UTC).astimezone(
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
        kept = self._snapshots.get((str(event["camera"]), str(event["label"])))
        # one that arrived before the event shows an earlier object (the topic is retained
        # and holds the latest object of that label on that camera); the MQTT snapshot is
        # cropped to the object by default, so the event's box (in the camera frame's
        # pixels) does not apply to it
        if kept is not None and kept[0] >= first_seen - SNAPSHOT_SLACK_S:
            return IncomingAlert(validate_alert(canonical), [RawImage("image", kept[1])])
        if not self.settings.api_url:
            return None
        snapshot = event.get("snapshot")
        # Frigate 0.14 and later: the box of the frame the snapshot shows
        box = snapshot.get("box") if isinstance(snapshot, dict) else event.get("box")
        if isinstance(box, list) and len(box) == 4:
            canonical["boxes"] = [
                dict(zip(("x1", "y1", "x2", "y2"), box, strict=True), label=event["label"])
            ]
        api = self.settings.api_url.rstrip("/")
        event_id = quote(str(event["id"]), safe="")
        canonical["image_url"] = f"{api}/api/events/{event_id}/snapshot.jpg"
        return IncomingAlert(validate_alert(canonical))


@hookimpl
def register_alert_formats(register, settings: Settings):
    register(FrigateFormat(settings.frigate))
