"""What happened, read from the journal for operators: recent alerts, snapshots, stats.

Read-only queries on the journal's connection for operators (`Journal.browse`), each led
by one of the journal's indexes; the web console and `/v1/stats` use them. Alerts are pruned
after `[storage] journal_max_age_days`, so the stats cover that long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from daemon.contract import utc_now
from daemon.journal import Journal

VERDICT_KINDS = ("confirmed", "rejected", "uncertain", "unreviewed")


@dataclass(frozen=True)
class AlertFilter:
    camera_id: str | None = None
    box_id: str | None = None
    rule: str | None = None
    verdict: str | None = None
    #: only alerts journalled before this row id (paging back)
    before: int | None = None
    limit: int = 50


async def recent_alerts(journal: Journal, where: AlertFilter) -> list[dict[str, Any]]:
    """Newest first: each alert with its verdicts and the latest feedback per rule."""
    args: list[Any] = []
    judged = [(c, v) for c, v in (("rule", where.rule), ("verdict", where.verdict)) if v]
    if judged and not where.camera_id:
        # led by the verdicts' index of that rule (or verdict), newest alert first
        sql = ["SELECT a.* FROM verdicts v JOIN alerts a ON a.id = v.alert_ref WHERE 1 = 1"]
        for column, value in judged:
            sql.append(f"AND v.{column} = ?")
            args.append(value)
        ref, tail = "v.alert_ref", "GROUP BY v.alert_ref ORDER BY v.alert_ref DESC LIMIT ?"
    else:
        # led by the camera's (or the box's, or the row ids') index: a camera of few alerts,
        # or none, is not looked for among every verdict of a rule
        sql = ["SELECT a.* FROM alerts a WHERE 1 = 1"]
        if judged:
            test = " ".join(f"AND v.{column} = ?" for column, _ in judged)
            sql.append(f"AND EXISTS (SELECT 1 FROM verdicts v WHERE v.alert_ref = a.id {test})")
            args += [value for _, value in judged]
        ref, tail = "a.id", "ORDER BY a.id DESC LIMIT ?"
    if where.camera_id:
        sql.append("AND json_extract(a.alert, '$.camera_id') = ?")  # as alerts_by_camera
        args.append(where.camera_id)
    if where.box_id:
        sql.append("AND a.box_id = ?")
        args.append(where.box_id)
    if where.before is not None:
        sql.append(f"AND {ref} < ?")
        args.append(where.before)
    sql.append(tail)
    args.append(max(1, min(where.limit, 500)))
    alerts = await journal.browse(" ".join(sql), args)
    refs = [row["id"] for row in alerts]
    verdicts = await _verdicts_of(journal, refs)
    feedback = await _feedback_of(journal, refs)
    images = await _image_counts(journal, refs)
    out = []
    for row in alerts:
        alert = json.loads(row["alert"])
        if not isinstance(alert, dict):  # edited by hand, or of a laxer version: as the journal
            alert = {}
        out.append(
            {
                "ref": row["id"],
                "alert_id": row["alert_id"],
                "box_id": row["box_id"],
                "camera_id": alert.get("camera_id"),
                "event_type": alert.get("event_type"),
                "site": alert.get("site"),
                "occurred_at": alert.get("occurred_at"),
                "score": alert.get("score"),
                "boxes": alert.get("boxes", []),
                "source": row["source"],
                "received_at": row["received_at"],
                "state": row["state"],
                "images": images.get(row["id"], 0),
                "verdicts": [
                    {**v, "feedback": feedback.get((row["id"], v["rule"]))}
                    for v in verdicts.get(row["id"], [])
                ],
            }
        )
    return out


@dataclass(frozen=True)
class StoredSnapshot:
    data: bytes
    #: the frame the alert's boxes are of (its `image`), not an extra frame (`images`)
    is_frame: bool


async def snapshot(journal: Journal, ref: int, idx: int) -> StoredSnapshot | None:
    """An alert's stored snapshot, None when gone (pruned) or never there (an `image_url`
    snapshot is fetched at review, not stored: its extra frames are)."""
    rows = await journal.browse(
        "SELECT source, data FROM alert_images WHERE alert_ref = ? AND idx = ?", (ref, idx)
    )
    if not rows:
        return None
    return StoredSnapshot(bytes(rows[0]["data"]), rows[0]["source"] == "image")


async def rule_counts(journal: Journal) -> dict[str, dict[str, int]]:
    """Per rule: its verdicts of each kind in the journal, and all of them (`alerts`)."""
    counts: dict[str, dict[str, int]] = {}
    for row in await journal.browse(
        "SELECT rule, verdict, count(*) AS n FROM verdicts WHERE rule IS NOT NULL "
        "GROUP BY rule, verdict"
    ):
        _tally(
            counts.setdefault(row["rule"], {"alerts": 0, **dict.fromkeys(VERDICT_KINDS, 0)}), row
        )
    return counts


async def rule_stats(journal: Journal, since: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Per rule: alerts, verdict counts, false alarms filtered, latency, measured precision."""
    since_text = (since or datetime.min.replace(tzinfo=utc_now().tzinfo)).isoformat()
    per_rule: dict[str, dict[str, Any]] = {}
    # counted and ranked by SQLite on the reader's thread: a journal of millions of
    # verdicts never passes through the event loop row by row
    for row in await journal.browse(
        "SELECT rule, verdict, count(*) AS n FROM verdicts INDEXED BY verdicts_by_time "
        "WHERE created_at >= ? AND rule IS NOT NULL GROUP BY rule, verdict",
        (since_text,),
    ):
        _tally(per_rule.setdefault(row["rule"], _empty_stats()), row)
    latency: dict[tuple[str, str], int] = {}
    for row in await journal.browse(_LATENCY_PERCENTILES, (since_text,)):
        for name, rank in (
            ("p50", (row["total"] + 1) // 2),
            ("p95", (95 * row["total"] + 99) // 100),
        ):
            if row["rank"] == rank:
                latency[(row["rule"], name)] = int(row["latency"])
    # the latest feedback per alert and rule, of those given since then: led by the time
    for row in await journal.browse(
        "SELECT f.rule, f.verdict, f.label, f.correct FROM feedback f INDEXED BY "
        "feedback_by_time WHERE f.created_at >= ? AND NOT EXISTS (SELECT 1 FROM feedback g "
        "WHERE g.alert_ref = f.alert_ref AND g.rule = f.rule AND g.id > f.id)",
        (since_text,),
    ):
        stats = per_rule.setdefault(row["rule"], _empty_stats())
        fb = stats["feedback"]
        fb["count"] += 1
        if row["correct"] is not None:
            fb["right" if row["correct"] else "wrong"] += 1
        if row["verdict"] == "confirmed" and row["label"] is not None:
            fb["confirmed_labelled"] += 1
            fb["confirmed_real"] += row["label"] == "real"
        if row["verdict"] == "rejected" and row["label"] is not None:
            fb["rejected_labelled"] += 1
            fb["rejected_false"] += row["label"] == "false"
    for rule, stats in per_rule.items():
        judged = sum(stats[kind] for kind in ("confirmed", "rejected", "uncertain"))
        stats["filtered_ratio"] = _ratio(stats["rejected"], judged)
        stats["latency_p50_ms"] = latency.get((rule, "p50"))
        stats["latency_p95_ms"] = latency.get((rule, "p95"))
        fb = stats["feedback"]
        fb["precision"] = _ratio(fb["confirmed_real"], fb["confirmed_labelled"])
        fb["rejections_right"] = _ratio(fb["rejected_false"], fb["rejected_labelled"])
    return per_rule


async def timeline(journal: Journal, *, hours: float = 24, buckets: int = 24) -> dict[str, Any]:
    """Verdict counts per rule and time bucket over the last `hours`, for charts."""
    end = utc_now()
    start = end - timedelta(hours=hours)
    width = max((end - start) / buckets, timedelta(microseconds=1))
    series: dict[str, dict[str, list[int]]] = {}
    # bucketed by SQLite (to the millisecond); a verdict stamped ahead goes in the last
    for row in await journal.browse(
        "SELECT rule, verdict, count(*) AS n, min(max(CAST((julianday(created_at) - "
        "julianday(?)) * 86400.0 / ? AS INTEGER), 0), ?) AS bucket FROM verdicts "
        "INDEXED BY verdicts_by_time WHERE created_at >= ? AND rule IS NOT NULL "
        "GROUP BY rule, verdict, bucket",
        (start.isoformat(), width.total_seconds(), buckets - 1, start.isoformat()),
    ):
        counts = series.setdefault(row["rule"], {kind: [0] * buckets for kind in VERDICT_KINDS})
        counts[row["verdict"]][row["bucket"]] += row["n"]
    return {
        "start": start.isoformat(),
        "bucket_s": width.total_seconds(),
        "buckets": buckets,
        "rules": series,
    }


def _tally(stats: dict[str, Any], row: Any) -> None:
    """Add a (rule, verdict, n) row to a rule's counts: its verdicts of that kind and all."""
    stats["alerts"] += row["n"]
    stats[row["verdict"]] = stats.get(row["verdict"], 0) + row["n"]


def _empty_stats() -> dict[str, Any]:
    return {
        "alerts": 0,
        **dict.fromkeys(VERDICT_KINDS, 0),
        "feedback": {
            "count": 0,
            "right": 0,
            "wrong": 0,
            "confirmed_labelled": 0,
            "confirmed_real": 0,
            "rejected_labelled": 0,
            "rejected_false": 0,
        },
    }


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


#: per rule, the latencies of the reviewed verdicts at the nearest ranks of p50 and p95
#: (rank ceil(q * total), in whole numbers)
_LATENCY_PERCENTILES = """
WITH reviewed AS (
    SELECT rule, json_extract(payload, '$.latency_ms') AS latency
    FROM verdicts INDEXED BY verdicts_by_time
    WHERE created_at >= ? AND rule IS NOT NULL AND verdict != 'unreviewed'
), ranked AS (
    SELECT rule, latency, row_number() OVER (PARTITION BY rule ORDER BY latency) AS rank,
           count(*) OVER (PARTITION BY rule) AS total
    FROM reviewed WHERE latency IS NOT NULL
)
SELECT rule, latency, rank, total FROM ranked
WHERE rank = (total + 1) / 2 OR rank = (95 * total + 99) / 100
"""


async def _rows_of(journal: Journal, select: str, refs: list[int], tail: str) -> list[Any]:
    """`SELECT ... WHERE alert_ref IN (refs) <tail>` on the reader."""
    if not refs:
        return []
    marks = ",".join("?" * len(refs))
    return await journal.browse(f"{select} WHERE alert_ref IN ({marks}) {tail}", refs)


async def _verdicts_of(journal: Journal, refs: list[int]) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {}
    select = "SELECT alert_ref, payload, published_at, prompt, raw FROM verdicts"
    for row in await _rows_of(journal, select, refs, "ORDER BY id"):
        verdict = json.loads(row["payload"])
        found.setdefault(row["alert_ref"], []).append(
            {
                "rule": verdict.get("rule"),
                "verdict": verdict.get("verdict"),
                "confidence": verdict.get("confidence"),
                "reason": verdict.get("reason"),
                "fields": verdict.get("fields", {}),
                "latency_ms": verdict.get("latency_ms"),
                "reviewed_at": verdict.get("reviewed_at"),
                "published": bool(row["published_at"]),  # '': made with MQTT off
                "prompt": row["prompt"],
                "raw": row["raw"],
            }
        )
    return found


async def _feedback_of(journal: Journal, refs: list[int]) -> dict[tuple[int, str], dict[str, Any]]:
    """The latest feedback per alert and rule."""
    select = (
        "SELECT alert_ref, rule, label, correct, fields, note, source, created_at FROM feedback"
    )
    return {
        (row["alert_ref"], row["rule"]): {
            "label": row["label"],
            "correct": None if row["correct"] is None else bool(row["correct"]),
            "fields": None if row["fields"] is None else json.loads(row["fields"]),
            "note": row["note"],
            "source": row["source"],
            "at": row["created_at"],
        }
        for row in await _rows_of(journal, select, refs, "ORDER BY id")
    }


async def _image_counts(journal: Journal, refs: list[int]) -> dict[int, int]:
    select = "SELECT alert_ref, count(*) AS n FROM alert_images"
    rows = await _rows_of(journal, select, refs, "GROUP BY alert_ref")
    return {row["alert_ref"]: int(row["n"]) for row in rows}
