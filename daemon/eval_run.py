"""`secondlook eval`: labelled alert files through the daemon's own pipeline, and the report.

A labelled file is an alert file with a top-level `"label": "real"` or `"false"`; the label is
taken out before the alert is reviewed. Reviews go through `replay` with every alert judged
on its own (no cooldown reuse, no staleness: labelled alerts are often old and alike).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from daemon.config import Settings
from daemon.evaluation import LABELS, Judged, rule_report
from daemon.plugins import Registry, make_plugin_manager
from daemon.replay import NO_RULE, printable, replay
from daemon.rules import RuleBook
from plugins.verdict import VerdictOptions


class LabelError(ValueError):
    """An alert file without a usable label."""


@dataclass(frozen=True)
class Labelled:
    label: str
    #: the alert as the pipeline gets it: the file's JSON without `label`
    payload: bytes


def read_labelled(path: Path) -> Labelled:
    """The label of an alert file, and the alert without it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"cannot read it: {exc}") from exc
    if not isinstance(data, dict):
        raise LabelError("not a JSON object")
    label = data.pop("label", None)
    if label not in LABELS:
        raise LabelError(f'"label" must be "real" or "false", got {label!r}')
    return Labelled(label, json.dumps(data).encode())


async def evaluate(
    settings: Settings,
    files: Sequence[Path],
    console: Console,
    *,
    target_miss_rate: float,
    target_precision: float | None = None,
) -> dict[str, Any]:
    """Review the labelled files and report, per rule; files that could not be used are
    listed under `errors` as {"file", "error"}."""
    errors: list[dict[str, str]] = []
    labelled: dict[Path, Labelled] = {}
    for path in files:
        try:
            labelled[path] = read_labelled(path)
        except LabelError as exc:
            errors.append({"file": printable(path.name), "error": str(exc)})
    payloads = {path: item.payload for path, item in labelled.items()}
    rows = await replay(settings, list(labelled), console, payloads=payloads, each_alone=True)
    judged: dict[str, list[Judged]] = {}
    ruled: set[Path] = set()
    for row in rows:
        if row.error == NO_RULE:
            continue  # listed as unmatched
        if row.verdict is None:
            errors.append({"file": printable(row.file.name), "error": row.error or "not reviewed"})
            continue
        verdict = row.verdict
        if verdict.rule is None:
            continue  # no rule, or only shadow rules (whose verdicts are counted)
        ruled.add(row.file)
        kind = verdict.verdict.value
        p_real = verdict.confidence if kind != "unreviewed" else None
        judged.setdefault(verdict.rule, []).append(
            Judged(printable(row.file.name), labelled[row.file].label, kind, p_real)
        )
    refused = {e["file"] for e in errors}
    unjudged = (printable(p.name) for p in labelled if p not in ruled)
    unmatched = [name for name in unjudged if name not in refused]
    info = rule_info(settings)
    rules = {}
    for name, judged_rows in sorted(judged.items()):
        kind, thresholds = info.get(name, (None, None))
        rules[name] = {
            "kind": kind,
            **rule_report(
                judged_rows,
                thresholds,
                target_miss_rate=target_miss_rate,
                target_precision=target_precision,
            ),
        }
    return {
        "files": len(files),
        "labelled": len(labelled),
        "unmatched": unmatched,
        "errors": errors,
        "target_miss_rate": target_miss_rate,
        "target_precision": target_precision,
        "rules": rules,
    }


def rule_info(settings: Settings) -> dict[str, tuple[str, dict[str, float] | None]]:
    """Each rule's kind, and for verdict rules their confirm_at / reject_below."""
    pm = make_plugin_manager(plugins_dir=settings.plugins.dir)
    book = RuleBook(settings.rules.dir, Registry.collect(pm, settings).rule_kinds)
    book.load()
    info: dict[str, tuple[str, dict[str, float] | None]] = {}
    for rule in book.rules:
        options = rule.options
        thresholds = (
            {"confirm_at": options.confirm_at, "reject_below": options.reject_below}
            if isinstance(options, VerdictOptions)
            else None
        )
        info[rule.name] = (rule.kind, thresholds)
    return info


def print_report(result: dict[str, Any], console: Console, out_dir: Path) -> None:
    """The report as a table, the files not used, and where the files went."""
    table = Table(title=f"secondlook eval: {result['labelled']} labelled alerts")
    for column in (
        "rule",
        "kind",
        "alerts",
        "real",
        "false",
        "accuracy",
        "false alarms filtered",
        "real rejected (miss)",
        "uncertain",
        "unreviewed",
        "current\nconfirm_at / reject_below",
        "best\nconfirm_at / reject_below",
    ):
        table.add_column(column)
    for name, rule in result["rules"].items():
        table.add_row(
            Text(name),
            rule["kind"] or "?",
            str(rule["alerts"]),
            str(rule["real"]),
            str(rule["false"]),
            _pct(rule["accuracy"]),
            _pct(rule["false_alarms_filtered"]),
            _pct(rule["real_alarms_rejected"]),
            _pct(rule["uncertain_share"]),
            _pct(rule["unreviewed_share"]),
            _pair(rule.get("current")),
            _pair(rule.get("best")),
        )
    console.print(table)
    if result["errors"]:
        errors = Table(title="files not used")
        errors.add_column("file")
        errors.add_column("error", overflow="fold")
        for error in result["errors"]:
            errors.add_row(Text(error["file"]), Text(error["error"]))
        console.print(errors)
    if result["unmatched"]:
        console.print(f"no rule matched: {', '.join(result['unmatched'])}", markup=False)
    precision = result["target_precision"]
    console.print(
        "accuracy counts uncertain and unreviewed as wrong; best: the most false alarms "
        f"filtered with at most {_pct(result['target_miss_rate'])} of real ones rejected"
        + (f", confirmations at least {_pct(precision)} real" if precision is not None else "")
        + "; ties: fewest uncertain"
    )
    if any((rule.get("best") or {}).get("few_real_alarms") for rule in result["rules"].values()):
        enough = math.ceil(1 / result["target_miss_rate"])
        console.print(
            f"* fitted to these alerts, which hold fewer than {enough} real ones: missing none "
            "of them says little of the next ones; label more before trusting it"
        )
    if any((rule.get("best") or {}).get("filters_nothing") for rule in result["rules"].values()):
        console.print(
            "(filters none): no pair rejects a false alarm without rejecting too many real "
            "ones: the rule's P(real) does not tell them apart on these alerts, so its pair "
            "only decides what is confirmed; change the prompt (or the model) first"
        )
    console.print(f"report.json, sweep.png, calibration.png in {out_dir}", markup=False)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _pair(point: dict[str, Any] | None) -> str:
    if not point:
        return "–"
    pair = f"{point['confirm_at']:g} / {point['reject_below']:g}"
    if point.get("few_real_alarms"):
        pair += " *"
    if point.get("filters_nothing"):
        pair += "\n(filters none)"
    if point.get("precision_target_met") is False:
        pair += f"\n(precision {_pct(point['confirmed_precision'])})"
    return pair
