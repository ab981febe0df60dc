"""`secondlook eval`: how well rules separate real alarms from false ones, on labelled alerts.

Each alert file carries `"label": "real"` or `"false"` next to the alert's fields. The
figures, per rule (over the alerts it reviewed):

- accuracy: confirmed real alarms plus rejected false ones, over all its alerts (an
  `uncertain` or `unreviewed` verdict is never counted right);
- false alarms filtered: false alarms it rejected, over all false alarms;
- real alarms wrongly rejected (the miss rate): real alarms it rejected, over all real ones;
- uncertain and unreviewed: shares of all its alerts.

The threshold sweep re-reads each P(real) with other `confirm_at` / `reject_below` values, as
the verdict kind does (confirmed at or above `confirm_at`, rejected below `reject_below`). The
best `reject_below` filters the most false alarms while missing at most the target share of
real ones (ties: the lowest); the best `confirm_at` is the lowest, not below it, at which the
confirmations are at least `target_precision` real (1.0 when none is).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from daemon.config import Settings
from daemon.plugins import Registry, make_plugin_manager
from daemon.replay import replay
from daemon.rules import RuleBook

LABELS = ("real", "false")
#: the sweep's grid of thresholds
GRID = tuple(round(i * 0.05, 2) for i in range(21))
CALIBRATION_BINS = 10


class LabelError(ValueError):
    """An alert file without a usable label."""


def read_label(path: Path) -> str:
    """The `label` of an alert file: real or false."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"{path.name}: cannot read it: {exc}") from exc
    label = data.get("label") if isinstance(data, dict) else None
    if label not in LABELS:
        raise LabelError(f'{path.name}: "label" must be "real" or "false", got {label!r}')
    return str(label)


@dataclass(frozen=True)
class Judged:
    """One rule's verdict on one labelled alert."""

    file: str
    label: str
    verdict: str
    #: P(real), None for extract rules and unreviewed alerts
    p_real: float | None


def verdict_at(p_real: float, confirm_at: float, reject_below: float) -> str:
    """The verdict kind's reading of P(real) (plugins/verdict.py)."""
    if p_real >= confirm_at:
        return "confirmed"
    if p_real < reject_below:
        return "rejected"
    return "uncertain"


def figures(rows: Sequence[Judged]) -> dict[str, Any]:
    """Counts and shares of one rule's verdicts against the labels."""
    real = [r for r in rows if r.label == "real"]
    false = [r for r in rows if r.label == "false"]

    def count(items: Sequence[Judged], verdict: str) -> int:
        return sum(1 for r in items if r.verdict == verdict)

    right = count(real, "confirmed") + count(false, "rejected")
    return {
        "alerts": len(rows),
        "real": len(real),
        "false": len(false),
        "confirmed": count(rows, "confirmed"),
        "rejected": count(rows, "rejected"),
        "uncertain": count(rows, "uncertain"),
        "unreviewed": count(rows, "unreviewed"),
        "accuracy": _share(right, len(rows)),
        "false_alarms_filtered": _share(count(false, "rejected"), len(false)),
        "real_alarms_rejected": _share(count(real, "rejected"), len(real)),
        "uncertain_share": _share(count(rows, "uncertain"), len(rows)),
        "unreviewed_share": _share(count(rows, "unreviewed"), len(rows)),
        "confirmed_precision": _share(count(real, "confirmed"), count(rows, "confirmed")),
    }


def at_thresholds(rows: Sequence[Judged], confirm_at: float, reject_below: float) -> dict[str, Any]:
    """The figures had the rule used these thresholds (alerts without a P(real) keep theirs)."""
    again = [
        Judged(r.file, r.label, verdict_at(r.p_real, confirm_at, reject_below), r.p_real)
        if r.p_real is not None
        else r
        for r in rows
    ]
    return {"confirm_at": confirm_at, "reject_below": reject_below, **figures(again)}


def sweep(rows: Sequence[Judged]) -> list[dict[str, Any]]:
    """Every (confirm_at >= reject_below) pair of the grid."""
    return [at_thresholds(rows, c, r) for r in GRID for c in GRID if c >= r]


def best_thresholds(
    points: Sequence[dict[str, Any]], target_miss_rate: float, target_precision: float
) -> dict[str, Any] | None:
    """See the module's docstring; None when no reject_below keeps misses within target."""
    allowed = [p for p in points if (p["real_alarms_rejected"] or 0.0) <= target_miss_rate + 1e-9]
    if not allowed:
        return None
    most = max(p["false_alarms_filtered"] or 0.0 for p in allowed)
    reject_below = min(
        p["reject_below"] for p in allowed if (p["false_alarms_filtered"] or 0.0) == most
    )
    candidates = sorted(
        (p for p in allowed if p["reject_below"] == reject_below), key=lambda p: p["confirm_at"]
    )
    precise = [
        p
        for p in candidates
        if p["confirmed_precision"] is not None and p["confirmed_precision"] >= target_precision
    ]
    return precise[0] if precise else candidates[-1]


def calibration(rows: Sequence[Judged], bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """Per P(real) bin: how many alerts, their mean P(real), and the share really real."""
    scored = [r for r in rows if r.p_real is not None]
    out = []
    for i in range(bins):
        low, high = i / bins, (i + 1) / bins
        inside = [
            r for r in scored if low <= r.p_real < high or (i == bins - 1 and r.p_real == 1.0)
        ]
        out.append(
            {
                "low": low,
                "high": high,
                "count": len(inside),
                "mean_p_real": _mean([r.p_real for r in inside]),
                "real_share": _share(sum(r.label == "real" for r in inside), len(inside)),
            }
        )
    return out


def report(
    judged: dict[str, list[Judged]],
    current: dict[str, dict[str, float]],
    *,
    target_miss_rate: float,
    target_precision: float,
) -> dict[str, Any]:
    """The whole evaluation, per rule."""
    rules = {}
    for name, rows in sorted(judged.items()):
        entry: dict[str, Any] = figures(rows)
        entry["current"] = current.get(name)
        if any(r.p_real is not None for r in rows):
            points = sweep(rows)
            entry["best"] = best_thresholds(points, target_miss_rate, target_precision)
            entry["sweep"] = points
            entry["calibration"] = calibration(rows)
        rules[name] = entry
    return {
        "target_miss_rate": target_miss_rate,
        "target_precision": target_precision,
        "rules": rules,
    }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _mean(values: Sequence[float]) -> float | None:
    return round(math.fsum(values) / len(values), 4) if values else None


async def evaluate(
    settings: Settings,
    files: Sequence[Path],
    console: Console,
    *,
    target_miss_rate: float,
    target_precision: float,
) -> dict[str, Any]:
    """Review the labelled files with the daemon's own pipeline (as `replay` does) and
    report; files that cannot be used are listed under `errors` with the reason."""
    errors: list[str] = []
    labels: dict[Path, str] = {}
    for path in files:
        try:
            labels[path] = read_label(path)
        except LabelError as exc:
            errors.append(str(exc))
    rows = await replay(settings, list(labels), console)
    judged: dict[str, list[Judged]] = {}
    unmatched = 0
    for row in rows:
        if row.verdict is None:
            errors.append(f"{row.file.name}: {row.error}")
            continue
        verdict = row.verdict
        if verdict.rule is None:
            unmatched += 1
            continue
        p_real = verdict.confidence if verdict.verdict.value != "unreviewed" else None
        judged.setdefault(verdict.rule, []).append(
            Judged(row.file.name, labels[row.file], verdict.verdict.value, p_real)
        )
    result = report(
        judged,
        current_thresholds(settings),
        target_miss_rate=target_miss_rate,
        target_precision=target_precision,
    )
    return {"files": len(files), "unmatched": unmatched, "errors": errors, **result}


def current_thresholds(settings: Settings) -> dict[str, dict[str, float]]:
    """confirm_at / reject_below of the rules that have them (the verdict kind)."""
    pm = make_plugin_manager(plugins_dir=settings.plugins.dir)
    book = RuleBook(settings.rules.dir, Registry.collect(pm, settings).rule_kinds)
    book.load()
    found = {}
    for rule in book.rules:
        options = rule.options
        if hasattr(options, "confirm_at") and hasattr(options, "reject_below"):
            found[rule.name] = {
                "confirm_at": float(options.confirm_at),
                "reject_below": float(options.reject_below),
            }
    return found
