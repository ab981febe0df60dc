"""Alert format `frigate`: events of the Frigate NVR, as its MQTT integration publishes them.

Subscribe this format to Frigate's topics (prefix `frigate` by default):

    [[mqtt.subscriptions]]
    topic = "frigate/events"
    format = "frigate"
    [[mqtt.subscriptions]]
    topic = "frigate/+/+/snapshot"
    format = "frigate"

`frigate/<camera>/<label>/snapshot` carries a JPEG of the best frame of the best object of
that label on that camera (by default cropped to the object, with its box drawn), and no
event id; a JPEG or PNG is kept in memory (MAX_SNAPSHOT_BYTES in all), and checked like any
snapshot, with the `[images]` settings of the moment, once an alert uses it. `frigate/events`
carries `{"type": "new" | "update" | "end", "before": {...}, "after": {...}}`; the `after`
object of a type listed in `[frigate] review` becomes an alert: id, camera, label,
start_time, top_score and zones. Its snapshot is the latest one kept for its camera and label
when that arrived after the event's first message of any type (less SNAPSHOT_SLACK_S; an
earlier one shows an earlier object) while no other event of that camera and label was live
(it could show that one's object instead: an event is live from its first message to its end,
or until nothing was heard of it for LIVE_S, Frigate repeating an event's message at least
once a minute, and while its object may be pictured: Frigate sends no snapshot of an object
that stands still or never moved), and that no other event went with, or else Frigate's
HTTP API (`[frigate] api_url` + /api/events/<id>/snapshot.jpg, the whole frame: the alert
then carries the detection box too when the event's message gives the box of that frame).
Without an API, an event whose
snapshot has not come yet (Frigate publishes the event first) waits for it: the snapshot's
message, or the event's next one, brings the alert in; its `end` without one is refused, and
so is the next message of one dropped from the MAX_WAITING events that wait at most. An event
whose first message here is of a later type than one reviewed (it began
before a restart, which may have caught it waiting) is reviewed at that message, with a
snapshot received since the start; the journal drops it if it was taken in before. A
retained snapshot (the broker sends it at subscribing, at every reconnect on MQTT 3.1.1) shows
an object of before: it is never taken as an event's own (a retained copy of the snapshot kept
changes nothing). Message
shapes follow Frigate's MQTT documentation
(docs.frigate.video/integrations/mqtt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple
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
#: events waiting for their snapshot, at most (the one heard of least recently is dropped)
MAX_WAITING = 256
#: events whose first message's arrival is remembered, at most
MAX_SEEN = 4096
#: an event is taken as over when nothing was heard of it for this long (Frigate repeats an
#: event's message at least once a minute while it tracks the object)
LIVE_S = 150.0
#: in the order Frigate sends them
EVENT_TYPES = ("new", "update", "end")

log = structlog.get_logger(__name__)


class _Seen(NamedTuple):
    """An event not ended: when its first and latest messages arrived (Unix time), and what."""

    first: float
    last: float
    camera: str
    label: str
    #: whether Frigate may publish a snapshot of its object now: not of one that stands
    #: still (`active` false, `stationary` true) or never moved (`position_changes` 0, which
    #: Frigate before 0.14 checks), by its latest message
    pictured: bool


class _Snapshot(NamedTuple):
    #: when it arrived (Unix time; 0 for a retained one)
    arrived: float
    data: bytes
    #: the events of its camera and label live when it arrived: whose object it may show
    live: frozenset[str]
    #: the event whose alert it went with: no other's
    taken_by: str | None = None


class FrigateFormat:
    name = "frigate"

    def __init__(self, settings: FrigateSettings) -> None:
        self.settings = settings
        #: when messages arrive (Unix time)
        self.clock: Callable[[], float] = time.time
        #: the latest snapshot per camera and label
        self._snapshots: dict[tuple[str, str], _Snapshot] = {}
        #: events of a reviewed type still without a snapshot, by id (least recently heard of
        #: first)
        self._waiting: dict[str, dict[str, Any]] = {}
        #: ids of events dropped from `_waiting`, refused at their next message
        self._dropped: dict[str, None] = {}
        #: recent events not ended, by id (least recently heard of first)
        self._seen_events: dict[str, _Seen] = {}
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
        known = event_id in self._seen_events
        first_seen = self._seen(event_id, event, ended=kind == "end")
        if event_id in self._dropped:
            del self._dropped[event_id]
            raise AlertError(
                "image",
                f"dropped while waiting for its snapshot: over {MAX_WAITING} events waited at once",
            )
        waiting = self._waiting.pop(event_id, None)
        caught_up = False
        if waiting is None and kind not in self.settings.review:
            if known or not self._missed_review(kind):
                return None
            # begun before the start: its reviewed message may have waited when the daemon
            # stopped; a snapshot received since the start is taken as its own
            caught_up = True
            first_seen = self._since or first_seen
            if event_id in self._seen_events:
                self._seen_events[event_id] = self._seen_events[event_id]._replace(first=first_seen)
        incoming = self._alert(event, first_seen)
        if incoming is not None:
            return incoming
        if kind == "end" and caught_up:
            log.info("frigate event seen first at its end, without a snapshot", frigate_id=event_id)
            return None
        if kind == "end":
            shared = self._snapshot_since(event, first_seen) is not None
            raise AlertError(
                "image",
                f"no snapshot received for {event['camera']}/{event['label']} before the event "
                "ended"
                + (" that could not show another event's object" if shared else "")
                + ", and no [frigate] api_url to fetch one from",
            )
        self._waiting[event_id] = event
        while len(self._waiting) > MAX_WAITING:
            dropped = next(iter(self._waiting))
            del self._waiting[dropped]
            self._dropped[dropped] = None
            while len(self._dropped) > MAX_SEEN:
                del self._dropped[next(iter(self._dropped))]
            log.warning(
                "frigate event dropped: waited too long for its snapshot", frigate_id=dropped
            )
        return None  # waits for its snapshot

    def _missed_review(self, kind: str) -> bool:
        """Whether an event's first message here comes after a type that is reviewed."""
        return any(
            earlier in self.settings.review for earlier in EVENT_TYPES[: EVENT_TYPES.index(kind)]
        )

    def _seen(self, event_id: str, event: dict[str, Any], *, ended: bool) -> float:
        """When the event's first message arrived (now, for its first); forgotten at its end."""
        now = self.clock()
        seen = self._seen_events.pop(event_id, None)
        first = seen.first if seen is not None else now
        if not ended:
            camera, label = str(event.get("camera")), str(event.get("label"))
            pictured = (
                event.get("active") is not False
                and event.get("stationary") is not True
                and event.get("position_changes") != 0
            )
            self._seen_events[event_id] = _Seen(first, now, camera, label, pictured)
            while len(self._seen_events) > MAX_SEEN:
                del self._seen_events[next(iter(self._seen_events))]
        return first

    def _live(self, camera: str, label: str) -> frozenset[str]:
        """The events of that camera and label heard of within LIVE_S, not ended, whose
        object Frigate may take a snapshot of."""
        since = self.clock() - LIVE_S
        live = set()
        for event_id, seen in reversed(self._seen_events.items()):
            if seen.last < since:
                break  # the rest were heard of earlier still
            if (seen.camera, seen.label, seen.pictured) == (camera, label, True):
                live.add(event_id)
        return frozenset(live)

    def _snapshot(self, camera: str, label: str, jpeg: bytes) -> IncomingAlert | None:
        """Keep a snapshot; the event that waited for it, if any, comes in with it."""
        if not jpeg.startswith((JPEG_MAGIC, PNG_MAGIC)):
            raise AlertError("image", "not a JPEG or PNG image")
        if len(jpeg) > MAX_SNAPSHOT_BYTES:
            raise AlertError("image", f"{len(jpeg)} bytes, over {MAX_SNAPSHOT_BYTES} kept at most")
        # a retained one (sent at subscribing) shows an object of before: never an event's own
        retained = message_retained()
        kept = self._snapshots.pop((camera, label), None)
        if retained and kept is not None and kept.data == jpeg:
            self._snapshots[(camera, label)] = kept  # a copy of the one kept: nothing new
            return None
        live = frozenset() if retained else self._live(camera, label)
        self._snapshots[(camera, label)] = _Snapshot(0.0 if retained else self.clock(), jpeg, live)
        while len(self._snapshots) > MAX_SNAPSHOTS or (
            len(self._snapshots) > 1
            and sum(len(kept.data) for kept in self._snapshots.values()) > MAX_SNAPSHOT_BYTES
        ):
            self._snapshots.pop(next(iter(self._snapshots)))
        # it shows the object of the one live event of its camera and label, if there is one
        if len(live) != 1:
            return None
        [owner] = live
        event = self._waiting.pop(owner, None)
        return None if event is None else self._alert(event, self._seen_events[owner].first)

    def _snapshot_since(self, event: dict[str, Any], first_seen: float) -> _Snapshot | None:
        """The snapshot kept for the event's camera and label when it came after the event's
        first message (less SNAPSHOT_SLACK_S): one from before shows an earlier object."""
        kept = self._snapshots.get((str(event["camera"]), str(event["label"])))
        return kept if kept is not None and kept.arrived >= first_seen - SNAPSHOT_SLACK_S else None

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
        kept = self._snapshot_since(event, first_seen)
        event_id = str(event["id"])
        # one that came while another event of them was live may show that one's object, and
        # one another event went with is that one's; the MQTT snapshot is cropped to the
        # object by default, so the event's box (in the camera frame's pixels) does not
        # apply to it
        if kept is not None and kept.live <= {event_id} and kept.taken_by in (None, event_id):
            where = (str(event["camera"]), str(event["label"]))
            self._snapshots[where] = kept._replace(taken_by=event_id)
            return IncomingAlert(validate_alert(canonical), [RawImage("image", kept.data)])
        if not self.settings.api_url:
            return None
        snapshot = event.get("snapshot")
        # the box of the frame the snapshot shows: Frigate 0.14 and later tell it; before,
        # the event's box is of its latest frame, which is the snapshot's only when their
        # times are one
        if isinstance(snapshot, dict):
            box = snapshot.get("box")
        elif event.get("snapshot_time") is not None and (
            event.get("frame_time") == event.get("snapshot_time")
        ):
            box = event.get("box")
        else:
            box = None
        if isinstance(box, list) and len(box) == 4:
            canonical["boxes"] = [
                dict(zip(("x1", "y1", "x2", "y2"), box, strict=True), label=event["label"])
            ]
        api = self.settings.api_url.rstrip("/")
        canonical["image_url"] = f"{api}/api/events/{quote(event_id, safe='')}/snapshot.jpg"
        return IncomingAlert(validate_alert(canonical))


@hookimpl
def register_alert_formats(register, settings: Settings):
    register(FrigateFormat(settings.frigate))
