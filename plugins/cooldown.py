"""`suppress_alert`: a repeat of a recently reviewed alert reuses its verdict.

A repeat is an alert of the same rule, box, camera and event type, within the rule's cooldown
window of the last model call and of that call's alert (`occurred_at`), each of whose boxes
overlaps one of that review's boxes (intersection over union at least the rule's `iou`): a
new detection beside a known false source gets a look of its own. Alerts without boxes
repeat each other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from daemon.hookspecs import hookimpl
from daemon.plugin_api import Judgement

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union > 0:
        return inter / union
    return 1.0 if tuple(a) == tuple(b) else 0.0  # zero-area boxes: the same point or line


def overlaps(mine: Sequence[Box], theirs: Sequence[Box], threshold: float) -> bool:
    """Whether each of `mine` overlaps one of `theirs` (both empty: the same, too)."""
    if not mine or not theirs:
        return not mine and not theirs
    return all(any(iou(a, b) >= threshold for b in theirs) for a in mine)


@hookimpl
def suppress_alert(alert, rule, recent):
    boxes = [(b.x1, b.y1, b.x2, b.y2) for b in alert.boxes]
    for review in recent:
        if overlaps(boxes, review.boxes, rule.cooldown.iou):
            age = time.monotonic() - review.at
            earlier = review.judgement
            reason = f"cooldown: as alert {review.alert_id} {age:.0f} s ago: {earlier.reason}"
            return Judgement(earlier.verdict, earlier.confidence, reason, earlier.fields)
    return None
