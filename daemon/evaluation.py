"""The figures of `secondlook eval`: pure functions over (label, verdict, P(real)) rows.

Per rule, over the labelled alerts it judged:

- accuracy: real alarms confirmed plus false alarms rejected, over all its alerts (an
  `uncertain` or `unreviewed` verdict never counts as right);
- false alarms filtered: false alarms it rejected, over all false alarms;
- real alarms wrongly rejected (the miss rate): real alarms it rejected, over all real ones;
- uncertain and unreviewed: shares of all its alerts.

The threshold sweep reads each P(real) again with other `confirm_at` / `reject_below` values,
with the verdict kind's own function. The best pair filters the most false alarms while
missing at most the target share of real ones; ties go to the fewest uncertain, then the
fewest misses, then the lowest thresholds. A target precision, when given, comes first: of
the pairs whose confirmations are at least that share real, the best by the rest. The rule's
current pair is a candidate too (it may lie off the grid), so the advice is never worse than
it; a rule that judged only real or only false alarms gets no advice (any pair looks right).
The advice is fitted to the alerts it is measured on: it says so when they hold fewer real
alarms than 1 / the target miss rate (`few_real_alarms`), whether the precision target
was reached (`precision_target_met`), and when no allowed pair filters any false alarm
(`filters_nothing`: the rule's P(real) does not tell them from the real ones; the pair then
only decides what is confirmed, and may be to confirm every alert).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from plugins.verdict import VerdictOptions, classify

LABELS = ("real", "false")
#: the sweep's grid of thresholds: 0.00 .. 1.00 in steps of 0.05
GRID = tuple(round(i * 0.05, 2) for i in range(21))
CALIBRATION_BINS = 10
#: slack for comparing rounded shares with a target
_EPS = 1e-9


@dataclass(frozen=True)
class Judged:
    """One rule's verdict on one labelled alert."""

    file: str
    label: str
    verdict: str
    #: P(real); None for extract rules and unreviewed alerts
    p_real: float | None


def verdict_at(p_real: float, confirm_at: float, reject_below: float) -> str:
    """The verdict the verdict kind gives this P(real) with these thresholds."""
    return classify(p_real, VerdictOptions(confirm_at=confirm_at, reject_below=reject_below)).value


def figures(rows: Sequence[Judged]) -> dict[str, Any]:
    """Counts and shares of one rule's verdicts against the labels (None: nothing to divide)."""
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
    """The figures had the rule used these thresholds (rows without P(real) keep theirs)."""
    again = [
        r
        if r.p_real is None
        else replace(r, verdict=verdict_at(r.p_real, confirm_at, reject_below))
        for r in rows
    ]
    return {"confirm_at": confirm_at, "reject_below": reject_below, **figures(again)}


def sweep(rows: Sequence[Judged]) -> list[dict[str, Any]]:
    """The figures at every pair of the grid with confirm_at >= reject_below."""
    return [at_thresholds(rows, c, r) for r in GRID for c in GRID if c >= r]


def best_thresholds(
    points: Sequence[Mapping[str, Any]],
    target_miss_rate: float,
    target_precision: float | None = None,
) -> Mapping[str, Any] | None:
    """The sweep point to recommend (see the module's docstring); None when every point
    misses more than the target."""
    allowed = [p for p in points if (p["real_alarms_rejected"] or 0.0) <= target_miss_rate + _EPS]

    def rank(p: Mapping[str, Any]) -> tuple[float, ...]:
        precision = p["confirmed_precision"]
        precise = target_precision is None or (
            precision is not None and precision >= target_precision - _EPS
        )
        return (
            float(precise),
            p["false_alarms_filtered"] or 0.0,
            -(p["uncertain_share"] or 0.0),
            -(p["real_alarms_rejected"] or 0.0),
            -p["reject_below"],
            -p["confirm_at"],
        )

    return max(allowed, key=rank, default=None)


def calibration(rows: Sequence[Judged], bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """Per P(real) bin [low, high) (the last one closed): alerts, mean P(real), share real."""
    scored = [r for r in rows if r.p_real is not None]
    out = []
    for i in range(bins):
        low, high = i / bins, (i + 1) / bins
        inside = [r for r in scored if _bin(r.p_real, bins) == i]
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


def rule_report(
    rows: Sequence[Judged],
    thresholds: Mapping[str, float] | None,
    *,
    target_miss_rate: float,
    target_precision: float | None = None,
) -> dict[str, Any]:
    """One rule's figures; with `thresholds` (a verdict rule's current ones) the sweep and the
    best pair too; with any P(real) the calibration table."""
    entry: dict[str, Any] = figures(rows)
    entry["current"] = dict(thresholds) if thresholds else None
    scored = any(r.p_real is not None for r in rows)
    if thresholds and scored:
        points = sweep(rows)
        # the current pair competes too (it may lie off the grid): never advise worse
        current = at_thresholds(rows, thresholds["confirm_at"], thresholds["reject_below"])
        entry["current"] = current
        # with one class only, any pair looks perfect: no advice
        both = entry["real"] > 0 and entry["false"] > 0
        best = (
            best_thresholds([*points, current], target_miss_rate, target_precision)
            if both
            else None
        )
        if best is not None:
            best = {**best, **_caveats(best, entry["real"], target_miss_rate, target_precision)}
        entry["best"] = best
        entry["sweep"] = points
    if scored:
        entry["calibration"] = calibration(rows)
    return _rounded(entry)


def _rounded(value: Any, key: str = "") -> Any:
    """Shares and means to 4 decimals, for reading (computed and compared unrounded: a share
    a hair over a target rounds to it); the thresholds as they are."""
    if isinstance(value, float) and key not in ("confirm_at", "reject_below"):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _caveats(
    best: Mapping[str, Any],
    real: int,
    target_miss_rate: float,
    target_precision: float | None,
) -> dict[str, Any]:
    """What the advice cannot promise. It is fitted to the very alerts it is measured on, so
    with fewer real alarms than 1 / the target miss rate, missing none of them says little of
    the next ones; and a precision target may be out of reach of every allowed pair."""
    caveats: dict[str, Any] = {
        "few_real_alarms": target_miss_rate > 0 and real < math.ceil(1 / target_miss_rate),
        "filters_nothing": not best["false_alarms_filtered"],
    }
    if target_precision is not None:
        precision = best["confirmed_precision"]
        caveats["precision_target_met"] = (
            precision is not None and precision >= target_precision - _EPS
        )
    return caveats


def _bin(p: float, bins: int) -> int:
    return min(bins - 1, max(0, math.floor(p * bins + _EPS)))


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None
