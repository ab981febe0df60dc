"""The PNG plots of `secondlook eval`: the threshold sweep and the calibration curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt


def _rules_with_scores(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, rule) for name, rule in report["rules"].items() if rule.get("sweep")]


def sweep_plot(report: dict[str, Any], path: Path) -> None:
    """Per rule: false alarms filtered and real alarms missed as `reject_below` varies."""
    rules = _rules_with_scores(report)
    fig, axes = plt.subplots(
        len(rules) or 1, 1, figsize=(7, 3.2 * max(1, len(rules))), squeeze=False
    )
    for ax, (name, rule) in zip(axes[:, 0], rules, strict=False):
        by_reject = {p["reject_below"]: p for p in rule["sweep"]}
        xs = sorted(by_reject)
        ax.plot(
            xs,
            [100 * (by_reject[x]["false_alarms_filtered"] or 0) for x in xs],
            label="false alarms filtered %",
            color="tab:green",
        )
        ax.plot(
            xs,
            [100 * (by_reject[x]["real_alarms_rejected"] or 0) for x in xs],
            label="real alarms rejected %",
            color="tab:red",
        )
        ax.axhline(100 * report["target_miss_rate"], color="tab:red", linestyle=":", linewidth=1)
        if rule.get("current"):
            ax.axvline(
                rule["current"]["reject_below"],
                color="gray",
                linestyle="--",
                label="current reject_below",
            )
        if rule.get("best"):
            ax.axvline(rule["best"]["reject_below"], color="tab:blue", label="best reject_below")
        ax.set_title(f"{name}: threshold sweep")
        ax.set_xlabel("reject_below (P(real))")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize="small", loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def calibration_plot(report: dict[str, Any], path: Path) -> None:
    """Per rule: the share of real alarms against the model's P(real), by bin, with counts."""
    rules = _rules_with_scores(report)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfectly calibrated")
    for name, rule in rules:
        bins = [b for b in rule["calibration"] if b["count"]]
        xs = [b["mean_p_real"] for b in bins]
        ys = [b["real_share"] for b in bins]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, b in zip(xs, ys, bins, strict=True):
            ax.annotate(
                str(b["count"]),
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="x-small",
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean P(real) in bin")
    ax.set_ylabel("share really real")
    ax.set_title("calibration (numbers: alerts per bin)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
