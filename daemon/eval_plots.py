"""The PNG plots of `secondlook eval`: the threshold sweep and the calibration curve."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes


def _rules_with(report: Mapping[str, Any], key: str) -> list[tuple[str, Mapping[str, Any]]]:
    return [(name, rule) for name, rule in report["rules"].items() if rule.get(key)]


def _pct(value: float | None) -> float:
    return 100 * (value or 0.0)


def _by_reject_below(rule: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """One sweep point per reject_below (filtered and missed do not depend on confirm_at)."""
    points = {p["reject_below"]: p for p in rule["sweep"]}
    return [points[x] for x in sorted(points)]


def _trade_off(ax: Axes, name: str, rule: Mapping[str, Any], target: float) -> None:
    points = _by_reject_below(rule)
    xs = [_pct(p["real_alarms_rejected"]) for p in points]
    ys = [_pct(p["false_alarms_filtered"]) for p in points]
    ax.plot(xs, ys, marker=".", color="tab:green")
    labelled: set[tuple[float, float]] = set()
    for x, y, p in zip(xs, ys, points, strict=True):
        if (x, y) in labelled:
            continue  # the lowest reject_below that gets there
        labelled.add((x, y))
        ax.annotate(
            f"{p['reject_below']:g}",
            (x, y),
            xytext=(3, -9),
            textcoords="offset points",
            fontsize="xx-small",
            color="gray",
        )
    ax.axvline(_pct(target), color="tab:red", linestyle=":", linewidth=1, label="target miss rate")
    for key, style in (("current", "s"), ("best", "*")):
        if rule.get(key):
            p = rule[key]  # its own figures (the current pair may lie off the grid)
            ax.plot(
                _pct(p["real_alarms_rejected"]),
                _pct(p["false_alarms_filtered"]),
                style,
                markersize=11,
                label=f"{key}: reject_below {rule[key]['reject_below']:g}",
            )
    ax.set_title(f"{name}: as reject_below varies", fontsize="medium")
    ax.set_xlabel("real alarms rejected (miss rate) %")
    ax.set_ylabel("false alarms filtered %")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.legend(fontsize="x-small", loc="lower right")


def _against_reject_below(ax: Axes, name: str, rule: Mapping[str, Any], target: float) -> None:
    points = _by_reject_below(rule)
    xs = [p["reject_below"] for p in points]
    ax.plot(
        xs,
        [_pct(p["false_alarms_filtered"]) for p in points],
        color="tab:green",
        label="false alarms filtered %",
    )
    ax.plot(
        xs,
        [_pct(p["real_alarms_rejected"]) for p in points],
        color="tab:red",
        label="real alarms rejected %",
    )
    ax.axhline(_pct(target), color="tab:red", linestyle=":", linewidth=1)
    if rule.get("current"):
        ax.axvline(rule["current"]["reject_below"], color="gray", linestyle="--", label="current")
    if rule.get("best"):
        ax.axvline(rule["best"]["reject_below"], color="tab:blue", label="best")
    ax.set_title(f"{name}: against reject_below", fontsize="medium")
    ax.set_xlabel("reject_below (P(real))")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize="x-small", loc="center right")


# rule names are shown as written: two `$` in one would be read as a formula (and fail)
@matplotlib.rc_context({"text.parse_math": False})
def sweep_plot(report: Mapping[str, Any], path: Path) -> None:
    """Per verdict rule: false alarms filtered against real alarms rejected as `reject_below`
    varies, and both against `reject_below`; the current and the best thresholds marked."""
    rules = _rules_with(report, "sweep")
    fig, axes = plt.subplots(
        max(1, len(rules)), 2, figsize=(11, 4.2 * max(1, len(rules))), squeeze=False
    )
    for row, (name, rule) in zip(axes, rules, strict=False):
        _trade_off(row[0], name, rule, report["target_miss_rate"])
        _against_reject_below(row[1], name, rule, report["target_miss_rate"])
    if not rules:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no verdict rule judged these alerts", ha="center", va="center")
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@matplotlib.rc_context({"text.parse_math": False})
def calibration_plot(report: Mapping[str, Any], path: Path) -> None:
    """Per rule with P(real): the share really real against the mean P(real) of each bin,
    each point labelled with its number of alerts."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfectly calibrated")
    for name, rule in _rules_with(report, "calibration"):
        bins = [b for b in rule["calibration"] if b["count"]]
        xs = [b["mean_p_real"] for b in bins]
        ys = [b["real_share"] for b in bins]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, b in zip(xs, ys, bins, strict=True):
            ax.annotate(
                f"n={b['count']}",
                (x, y),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize="x-small",
            )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("mean P(real) in bin (bins of 0.1)")
    ax.set_ylabel("share really real")
    ax.set_title("calibration")
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
