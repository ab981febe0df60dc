"""`secondlook eval` on labelled alerts, with a scripted model whose answers are known, so that
every figure can be checked by hand; and once through the real model code on the samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from daemon.cli import main
from daemon.eval_plots import calibration_plot, sweep_plot
from daemon.eval_run import read_labelled
from daemon.evaluation import Judged, best_thresholds, rule_report, sweep
from tests.conftest import RULES, SAMPLES, make_alert

#: P(real) the scripted model gives each fire alert, by what the alert really was
CASES = {
    "real": [0.95, 0.85, 0.75, 0.55, 0.35, 0.15],
    "false": [0.90, 0.65, 0.45, 0.30, 0.10, 0.05],
}

SCRIPTED = '''
import re
from daemon.hookspecs import hookimpl
from daemon.plugin_api import ChoiceAnswer


class ScriptedBackend:
    """P(first choice) = the number in the alert id the prompt names ("real-p085" -> 0.85)."""

    image_factor = 28

    def __init__(self, settings):
        self.model_name = "scripted"

    async def start(self):
        return None

    async def close(self):
        return None

    async def run(self, request):
        p = int(re.search(r"-p(\\d{3})", request.query.prompt).group(1)) / 100
        first, second = request.query.choices
        return ChoiceAnswer({first: p, second: 1 - p}, {first: 0.0, second: 0.0})


@hookimpl
def register_backends(register):
    register("scripted", ScriptedBackend)
'''

#: every alert is old and they all repeat each other (one camera, no boxes): cooldown and
#: max_age_s would spoil the figures if eval did not judge each alert on its own
FIRE_RULE = """
max_age_s = 60
[match]
event_types = ["fire"]
[review]
kind = "verdict"
prompt = "Alert {alert_id}: is there a real fire? Answer yes or no."
confirm_at = 0.6
reject_below = 0.4
[cooldown]
window_s = 3600
"""

SOURCE_RULE = """
shadow = true
[match]
event_types = ["fire", "smoke"]
[review]
kind = "classify"
prompt = "Alert {alert_id}: flame or lamp?"
labels = ["flame", "lamp"]
confirm = ["flame"]
reject = ["lamp"]
"""


def labelled(label: Any, p: float, event_type: str = "fire") -> dict[str, Any]:
    alert = make_alert(f"{event_type}-{label}-p{round(p * 100):03d}", event_type=event_type)
    return {**alert, "label": label}


def write_case(tmp_path: Path, backend: str = "scripted", model: str = "unused") -> Path:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "scripted.py").write_text(SCRIPTED)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "fire.toml").write_text(FIRE_RULE)
    (tmp_path / "rules" / "source.toml").write_text(SOURCE_RULE)
    alerts = tmp_path / "labelled"
    alerts.mkdir()
    files = {f"{label}-{p}.json": labelled(label, p) for label, ps in CASES.items() for p in ps}
    files["smoke-real.json"] = labelled("real", 0.80, "smoke")  # only the shadow rule's
    files["intrusion-false.json"] = labelled("false", 0.50, "intrusion")  # no rule's
    files["unlabelled.json"] = make_alert("nolabel")
    files["badlabel.json"] = labelled("maybe", 0.5)
    files["broken.json"] = {"alert_id": "broken", "label": "real"}
    for name, data in files.items():
        (alerts / name).write_text(json.dumps(data))
    config = tmp_path / "secondlook.toml"
    config.write_text(
        f'[model]\nbackend = "{backend}"\npath = "{model}"\n[rules]\ndir = "rules"\n'
        '[plugins]\ndir = "plugins"\n'
    )
    return config


def run_eval(directory: Path, out: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["eval", str(directory), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return result.output


def json_report(output: str) -> dict[str, Any]:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "labelled", write_case(tmp_path)


def test_every_figure_of_the_report_matches_the_known_answers(case, tmp_path):
    alerts, config = case
    out = tmp_path / "report"
    report = json_report(run_eval(alerts, out, "--config", str(config), "--json"))
    assert report == json.loads((out / "report.json").read_text())
    assert (report["files"], report["labelled"]) == (17, 15)
    assert report["unmatched"] == ["intrusion-false.json"]
    errors = {e["file"]: e["error"] for e in report["errors"]}
    assert set(errors) == {"badlabel.json", "unlabelled.json", "broken.json"}
    assert errors["badlabel.json"] == '"label" must be "real" or "false", got \'maybe\''
    assert errors["unlabelled.json"] == '"label" must be "real" or "false", got None'
    assert "box_id" in errors["broken.json"]  # refused by the pipeline, not by eval

    fire = report["rules"]["fire"]
    # at 0.6 / 0.4: real 0.95 0.85 0.75 confirmed, 0.55 uncertain, 0.35 0.15 rejected;
    # false 0.90 0.65 confirmed, 0.45 uncertain, 0.30 0.10 0.05 rejected
    assert (fire["kind"], fire["alerts"], fire["real"], fire["false"]) == ("verdict", 12, 6, 6)
    assert (fire["confirmed"], fire["rejected"], fire["uncertain"], fire["unreviewed"]) == (
        5,
        5,
        2,
        0,
    )
    assert fire["accuracy"] == 0.5  # 3 real confirmed + 3 false rejected, of 12
    assert fire["false_alarms_filtered"] == 0.5  # 3 of 6
    assert fire["real_alarms_rejected"] == 0.3333  # 2 of 6
    assert fire["uncertain_share"] == 0.1667  # 2 of 12
    assert fire["unreviewed_share"] == 0.0
    assert fire["confirmed_precision"] == 0.6  # 3 of 5
    assert (fire["current"]["confirm_at"], fire["current"]["reject_below"]) == (0.6, 0.4)

    points = {(p["confirm_at"], p["reject_below"]): p for p in fire["sweep"]}
    assert len(points) == 21 * 22 // 2  # every confirm_at >= reject_below of 0.00 .. 1.00
    # 0.5 / 0.2: real 4 confirmed, 0.35 uncertain, 0.15 rejected; false 2 confirmed,
    # 0.45 0.30 uncertain, 0.10 0.05 rejected
    p = points[(0.5, 0.2)]
    assert (p["accuracy"], p["false_alarms_filtered"], p["real_alarms_rejected"]) == (
        0.5,
        0.3333,
        0.1667,
    )
    assert p["uncertain_share"] == 0.25
    # 0.7 / 0.7: real 3 confirmed 3 rejected; false 0.90 confirmed, 5 rejected
    p = points[(0.7, 0.7)]
    assert (p["accuracy"], p["false_alarms_filtered"], p["real_alarms_rejected"]) == (
        0.6667,
        0.8333,
        0.5,
    )
    assert p["uncertain_share"] == 0.0
    p = points[(1.0, 0.0)]  # nothing is sure enough either way
    assert (p["uncertain_share"], p["accuracy"], p["false_alarms_filtered"]) == (1.0, 0.0, 0.0)

    # 5 % of 6 real alarms: none may be rejected, so reject below 0.15 (0.10 and 0.05
    # filtered); the fewest uncertain: confirm at 0.15 too
    best = fire["best"]
    assert (best["confirm_at"], best["reject_below"]) == (0.15, 0.15)
    assert (best["false_alarms_filtered"], best["real_alarms_rejected"]) == (0.3333, 0.0)
    assert best["uncertain_share"] == 0.0

    bins = [(b["count"], b["real_share"]) for b in fire["calibration"]]
    assert bins == [
        (1, 0.0),  # 0.05 f
        (2, 0.5),  # 0.15 r, 0.10 f
        (0, None),
        (2, 0.5),  # 0.35 r, 0.30 f
        (1, 0.0),  # 0.45 f
        (1, 1.0),  # 0.55 r
        (1, 0.0),  # 0.65 f
        (1, 1.0),  # 0.75 r
        (1, 1.0),  # 0.85 r
        (2, 0.5),  # 0.95 r, 0.90 f
    ]
    assert fire["calibration"][9]["mean_p_real"] == 0.925

    # the shadow classify rule: flame (confirmed) when p > 0.5, lamp (rejected) below; it also
    # judged the smoke alert (real, 0.80)
    source = report["rules"]["source"]
    assert (source["kind"], source["alerts"], source["real"], source["false"]) == (
        "classify",
        13,
        7,
        6,
    )
    assert (source["confirmed"], source["rejected"], source["uncertain"]) == (7, 6, 0)
    assert source["accuracy"] == 0.6923  # 5 real confirmed + 4 false rejected, of 13
    assert source["false_alarms_filtered"] == 0.6667  # 4 of 6
    assert source["real_alarms_rejected"] == 0.2857  # 2 of 7
    assert source["current"] is None and "sweep" not in source and "best" not in source
    assert [b["count"] for b in source["calibration"]] == [1, 2, 0, 2, 1, 1, 1, 1, 2, 2]
    assert source["calibration"][8]["real_share"] == 1.0  # 0.85 r, 0.80 r


def test_a_looser_miss_target_and_a_precision_target_move_the_best_thresholds(case, tmp_path):
    alerts, config = case
    out = tmp_path / "report"
    loose = json_report(
        run_eval(alerts, out, "--config", str(config), "--json", "--target-miss-rate", "0.34")
    )
    best = loose["rules"]["fire"]["best"]
    # 2 of 6 real may go (0.35, 0.15): reject below 0.5 filters 0.45 0.30 0.10 0.05
    assert (best["confirm_at"], best["reject_below"]) == (0.5, 0.5)
    assert (best["false_alarms_filtered"], best["real_alarms_rejected"]) == (0.6667, 0.3333)

    precise = json_report(
        run_eval(alerts, out, "--config", str(config), "--json", "--target-precision", "0.9")
    )
    best = precise["rules"]["fire"]["best"]
    # only at 0.95 are the confirmations (0.95 r) at least 90 % real; 0.15 .. 0.90 uncertain
    assert (best["confirm_at"], best["reject_below"]) == (0.95, 0.15)
    assert (best["confirmed_precision"], best["uncertain_share"]) == (1.0, 0.75)


def test_targets_that_are_no_numbers_are_refused(case, tmp_path):
    alerts, config = case
    for option in ("--target-miss-rate", "--target-precision"):
        args = ["eval", str(alerts), "--out", str(tmp_path), "--config", str(config)]
        result = CliRunner().invoke(main, [*args, option, "nan"])
        assert result.exit_code == 2 and "expected a number" in result.output, result.output
        assert not (tmp_path / "report.json").exists()


def test_ties_in_false_alarms_filtered_go_to_the_fewest_uncertain():
    p_real = {"real": (0.3, 0.8, 0.9), "false": (0.1, 0.85)}
    points = sweep([Judged("", label, "", p) for label, ps in p_real.items() for p in ps])
    # only 0.10 can be filtered within 1 miss of 3; confirm_at = reject_below leaves none
    # uncertain; then the fewest misses: reject below 0.15
    best = best_thresholds(points, target_miss_rate=0.34)
    assert best is not None and (best["confirm_at"], best["reject_below"]) == (0.15, 0.15)
    # confirmations 80 % real: confirm at 0.9 only; rejecting 0.3 too (1 miss, within the
    # target) leaves 0.8 and 0.85 uncertain rather than 0.3, 0.8 and 0.85
    best = best_thresholds(points, target_miss_rate=0.34, target_precision=0.8)
    assert best is not None and (best["confirm_at"], best["reject_below"]) == (0.9, 0.35)
    assert (best["uncertain_share"], best["real_alarms_rejected"]) == pytest.approx((0.4, 1 / 3))
    best = best_thresholds(points, target_miss_rate=0.0, target_precision=0.8)
    assert best is not None and (best["confirm_at"], best["reject_below"]) == (0.9, 0.15)
    assert best_thresholds([p for p in points if p["real_alarms_rejected"] > 0], 0.0) is None


def test_a_precision_target_within_reach_is_met_whatever_filters_more():
    p_real = {
        "real": (0.05, 0.06, 0.11, 0.21, 0.47, 0.6, 0.74, 0.9),
        "false": (0.39, 0.87, 0.94),
    }
    points = sweep([Judged("", label, "", p) for label, ps in p_real.items() for p in ps])
    best = best_thresholds(points, target_miss_rate=0.5, target_precision=0.7)
    # rejecting below 0.4 filters a third of the false alarms, but confirmations would be
    # 67 % real: confirming everything (73 % real) meets the target
    assert best is not None and best["confirmed_precision"] >= 0.7
    assert best["false_alarms_filtered"] == 0.0


def test_the_advice_is_never_worse_than_the_current_thresholds_and_needs_both_classes():
    # reject_below = 0.42 lies off the grid: rejecting 0.41 and 0.2, keeping 0.43
    rows = [
        Judged("", label, "", p)
        for label, p in (("real", 0.9), ("real", 0.43), ("false", 0.41), ("false", 0.2))
    ]
    current = {"confirm_at": 0.6, "reject_below": 0.42}
    report = rule_report(rows, current, target_miss_rate=0.05)
    assert report["current"]["false_alarms_filtered"] == 1.0  # its own figures, not the grid's
    best = report["best"]
    assert (best["false_alarms_filtered"], best["real_alarms_rejected"]) == (1.0, 0.0)
    # one class only: every pair looks perfect, so nothing is advised
    only_real = rule_report(rows[:2], current, target_miss_rate=0.05)
    assert only_real["best"] is None and only_real["sweep"]


def test_the_miss_target_is_compared_with_the_share_unrounded(tmp_path):
    rows = [Judged("", "real", "", p) for p in (0.9, 0.9, 0.1)] + [
        Judged("", "false", "", 0.1) for _ in range(3)
    ]
    report = rule_report(rows, {"confirm_at": 0.6, "reject_below": 0.05}, target_miss_rate=0.3333)
    # rejecting at 0.15 misses 1 of 3 real alarms: 0.33333..., over the target
    assert report["best"]["real_alarms_rejected"] == 0.0
    # and the plots show a rule named with dollars as written
    report = {"rules": {"fire_$zone_$": report}, "target_miss_rate": 0.3333}
    sweep_plot(report, tmp_path / "sweep.png")
    calibration_plot(report, tmp_path / "calibration.png")
    assert (tmp_path / "sweep.png").stat().st_size and (tmp_path / "calibration.png").stat().st_size


def test_the_advice_says_what_it_cannot_promise():
    rows = [Judged("", "real", "", p) for p in (0.9, 0.8, 0.7)] + [
        Judged("", "false", "", p) for p in (0.95, 0.9, 0.2)
    ]
    current = {"confirm_at": 0.6, "reject_below": 0.4}
    best = rule_report(rows, current, target_miss_rate=0.0, target_precision=0.9)["best"]
    # 0.95 and 0.9 false above every real one: no pair that misses none is 90 % precise
    assert best["confirmed_precision"] < 0.9 and best["precision_target_met"] is False
    assert best["few_real_alarms"] is False  # a zero target: no count is too few
    best = rule_report(rows, current, target_miss_rate=0.05)["best"]
    assert best["few_real_alarms"] is True and "precision_target_met" not in best
    many = [Judged("", "real", "", 0.9)] * 20 + [Judged("", "false", "", 0.1)]
    best = rule_report(many, current, target_miss_rate=0.05)["best"]
    assert best["few_real_alarms"] is False and best["filters_nothing"] is False
    # every false alarm scored above a real one: none can be rejected without missing it
    backwards = [Judged("", "real", "", 0.3), Judged("", "false", "", 0.9)]
    best = rule_report(backwards, current, target_miss_rate=0.0)["best"]
    assert best["false_alarms_filtered"] == 0 and best["filters_nothing"] is True


PAGER = """
from daemon.hookspecs import hookimpl


@hookimpl
def verdict_ready(alert, rule, verdict):
    with open({path!r}, "a") as paged:
        paged.write(alert.alert_id + "\\n")
"""


def test_eval_and_replay_page_nobody(case, tmp_path):
    alerts, config = case
    paged = tmp_path / "paged.txt"
    (tmp_path / "plugins" / "pager.py").write_text(PAGER.format(path=str(paged)))
    run_eval(alerts, tmp_path / "report", "--config", str(config))
    runner = CliRunner()
    result = runner.invoke(
        main, ["replay", str(alerts / "real-0.95.json"), "--config", str(config)]
    )
    assert "fire-real-p095" in result.output, result.output
    assert not paged.exists(), paged.read_text()


def test_alerts_dropped_for_want_of_a_rule_are_listed_as_unmatched(case, tmp_path):
    alerts, config = case
    config.write_text(config.read_text().replace("[rules]\n", '[rules]\nunmatched = "drop"\n'))
    report = json_report(run_eval(alerts, tmp_path / "report", "--config", str(config), "--json"))
    assert report["unmatched"] == ["intrusion-false.json"]
    assert "intrusion-false.json" not in {e["file"] for e in report["errors"]}


def fire_rows(output: str) -> list[dict[str, Any]]:
    """The `fire` rule's rows of `replay --json`."""
    rows = [json.loads(line) for line in output.splitlines() if line.startswith('{"file"')]
    return [row for row in rows if row["verdict"]["rule"] == "fire"]


def test_replay_judges_an_old_alert_afresh_unless_asked_to_judge_as_live(case, tmp_path):
    alerts, config = case
    # the case's fire rule has max_age_s = 60 (and a cooldown)
    old = alerts / "real-0.95.json"  # occurred 2026-11-20: long past 60 s
    fresh = CliRunner().invoke(main, ["replay", str(old), "--config", str(config), "--json"])
    [row] = fire_rows(fresh.output)
    assert row["verdict"]["verdict"] == "confirmed", row
    live = CliRunner().invoke(
        main, ["replay", str(old), "--config", str(config), "--json", "--as-live"]
    )
    [row] = fire_rows(live.output)
    assert row["verdict"]["verdict"] == "unreviewed"
    assert row["verdict"]["reason"].startswith("stale: the alert is")


def test_the_table_names_rules_figures_and_the_files_not_used(case, tmp_path):
    alerts, config = case
    out = tmp_path / "report"
    table = run_eval(alerts, out, "--config", str(config))
    fire = next(line for line in table.splitlines() if line.startswith("│ fire "))
    cells = [cell.strip() for cell in fire.strip("│ ").split("│")]
    assert cells == [
        "fire",
        "verdict",
        "12",
        "6",
        "6",
        "50.0 %",
        "50.0 %",
        "33.3 %",
        "16.7 %",
        "0.0 %",
        "0.6 / 0.4",
        "0.15 / 0.15 *",  # six real alarms: too few to trust a 5 % miss rate
    ]
    assert "* fitted to these alerts, which hold fewer than 20 real ones" in table
    assert "│ source " in table and "69.2 %" in table
    for name in ("unlabelled.json", "badlabel.json", "broken.json"):
        assert name in table
    assert "no rule matched: intrusion-false.json" in table
    for name in ("report.json", "sweep.png", "calibration.png"):
        assert (out / name).stat().st_size > 0
    for name in ("sweep.png", "calibration.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.width >= 400 and image.height >= 400


def test_the_label_is_taken_out_before_review(tmp_path):
    path = tmp_path / "a.json"
    alert = make_alert("a1")
    path.write_text(json.dumps({**alert, "label": "false"}))
    item = read_labelled(path)
    assert item.label == "false" and json.loads(item.payload) == alert


def test_the_real_model_path_yields_a_report_for_the_samples(tmp_path, tiny_model):
    out = tmp_path / "report"
    output = run_eval(SAMPLES, out, "--rules", str(RULES), "--model", str(tiny_model), "--json")
    report = json_report(output)
    samples = sorted(SAMPLES.glob("*.json"))
    assert (report["files"], report["labelled"], report["errors"]) == (len(samples), 9, [])
    rules = report["rules"]
    assert (rules["open_fire"]["real"], rules["open_fire"]["false"]) == (1, 1)
    assert (rules["helmet"]["real"], rules["helmet"]["false"]) == (1, 1)
    assert rules["fire_source"]["kind"] == "classify" and rules["fire_source"]["alerts"] == 2
    assert rules["people_extraction"]["kind"] == "extract"
    assert "calibration" not in rules["people_extraction"]
    for rule in rules.values():
        if rule["kind"] == "verdict":
            assert len(rule["sweep"]) == 231
            # advice only where real and false alarms were both judged
            assert (rule["best"] is not None) == (rule["real"] > 0 and rule["false"] > 0)
            assert sum(b["count"] for b in rule["calibration"]) == rule["alerts"]
            assert all(0 <= b["mean_p_real"] <= 1 for b in rule["calibration"] if b["count"])
    for name in ("sweep.png", "calibration.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"


def test_a_run_that_measured_nothing_fails(tmp_path, tiny_model):
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    (alerts / "unlabelled.json").write_text(json.dumps(make_alert("u-1")))
    (alerts / "[odd].json").write_text("{not json")
    out = tmp_path / "report"
    args = ["eval", str(alerts), "--out", str(out), "--rules", str(RULES)]
    result = CliRunner().invoke(main, [*args, "--model", str(tiny_model)])
    assert result.exit_code == 1
    assert "no labelled alert was judged by a rule" in result.output
    assert "[odd].json" in result.output  # file names shown as they are
    # an output path where no folder can be made: said before any model loads
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(
        main, ["eval", str(alerts), "--out", str(tmp_path / "file" / "r"), "--model", "/none"]
    )
    assert result.exit_code == 1 and "cannot write into" in result.output
