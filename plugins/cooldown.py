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

import numpy as np

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


def iou_matrix(mine: Sequence[Box], theirs: Sequence[Box]) -> np.ndarray:
    """`iou` of each of `mine` (rows) with each of `theirs` (columns), at once: an alert may
    carry hundreds of boxes, and this runs on the event loop."""
    a = np.asarray(mine, dtype=np.float64)[:, None, :]
    b = np.asarray(theirs, dtype=np.float64)[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    union = area + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    same = np.all(a == b, axis=-1).astype(np.float64)  # zero-area boxes, as in `iou`
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), same)


def overlaps(mine: Sequence[Box], theirs: Sequence[Box], threshold: float) -> bool:
    """Whether each of `mine` overlaps one of `theirs` (both empty: the same, too)."""
    if not mine or not theirs:
        return not mine and not theirs
    return bool((iou_matrix(mine, theirs) >= threshold).any(axis=1).all())


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
