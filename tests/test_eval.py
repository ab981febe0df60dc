"""`secondlook eval` on labelled alerts, with a scripted model whose answers are known, so that
every figure can be checked by hand; and once through the real model code."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from daemon.cli import main
from tests.conftest import make_alert

#: P(real) the scripted model gives each alert, and what the alert really was
CASES = {
    "real": [0.95, 0.85, 0.75, 0.55, 0.35, 0.15],
    "false": [0.90, 0.65, 0.45, 0.30, 0.10, 0.05],
}

SCRIPTED = '''
import re
from daemon.hookspecs import hookimpl
from daemon.plugin_api import ChoiceAnswer


class ScriptedBackend:
    """Answers P(yes) = the number in the prompt's camera id ("cam-p085" -> 0.85)."""

    image_factor = 28

    def __init__(self, settings):
        self.model_name = "scripted"

    async def start(self):
        return None

    async def close(self):
        return None

    async def run(self, request):
        p = int(re.search(r"cam-p(\\d{3})", request.query.prompt).group(1)) / 100
        return ChoiceAnswer({"yes": p, "no": 1 - p}, {"yes": 0.0, "no": 0.0})


@hookimpl
def register_backends(register):
    register("scripted", ScriptedBackend)
'''

RULE = """
[match]
event_types = ["fire"]
[review]
kind = "verdict"
prompt = "Camera {camera_id}: is there a real fire? Answer yes or no."
confirm_at = 0.6
reject_below = 0.4
"""


def write_case(tmp_path: Path, backend: str = "scripted", model: str = "unused") -> Path:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "scripted.py").write_text(SCRIPTED)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "fire.toml").write_text(RULE)
    alerts = tmp_path / "labelled"
    alerts.mkdir()
    for label, scores in CASES.items():
        for p in scores:
            alert = make_alert(f"{label}-{p}", camera_id=f"cam-p{round(p * 100):03d}")
            (alerts / f"{label}-{p}.json").write_text(json.dumps({**alert, "label": label}))
    (alerts / "unlabelled.json").write_text(json.dumps(make_alert("nolabel")))
    config = tmp_path / "secondlook.toml"
    config.write_text(
        f'[model]\nbackend = "{backend}"\npath = "{model}"\n[rules]\ndir = "rules"\n'
        '[plugins]\ndir = "plugins"\n'
    )
    return config


def run_eval(tmp_path: Path, config: Path, *extra: str) -> dict:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        main,
        ["eval", str(tmp_path / "labelled"), "--config", str(config), "--out", str(out), *extra],
    )
    assert result.exit_code == 0, result.output
    return {"output": result.output, "out": out}


def test_every_figure_of_the_report_matches_the_known_answers(tmp_path):
    config = write_case(tmp_path)
    run = run_eval(tmp_path, config, "--json", "--target-miss-rate", "0")
    report = json.loads(run["output"].strip().splitlines()[-1])
    assert report == json.loads((run["out"] / "report.json").read_text())
    assert report["files"] == 13
    assert report["errors"] == ['unlabelled.json: "label" must be "real" or "false", got None']
    fire = report["rules"]["fire"]
    # at 0.6 / 0.4: real 0.95 0.85 0.75 confirmed, 0.55 uncertain, 0.35 0.15 rejected;
    # false 0.90 0.65 confirmed, 0.45 uncertain, 0.30 0.10 0.05 rejected
    assert (fire["alerts"], fire["real"], fire["false"]) == (12, 6, 6)
    assert (fire["confirmed"], fire["rejected"], fire["uncertain"]) == (5, 5, 2)
    assert fire["accuracy"] == 0.5  # 3 real confirmed + 3 false rejected, of 12
    assert fire["false_alarms_filtered"] == 0.5  # 3 of 6
    assert fire["real_alarms_rejected"] == 0.3333  # 2 of 6
    assert fire["uncertain_share"] == 0.1667 and fire["unreviewed_share"] == 0.0
    assert fire["confirmed_precision"] == 0.6  # 3 of 5
    assert fire["current"] == {"confirm_at": 0.6, "reject_below": 0.4}

    point = next(p for p in fire["sweep"] if (p["confirm_at"], p["reject_below"]) == (0.5, 0.2))
    assert (point["false_alarms_filtered"], point["real_alarms_rejected"]) == (0.3333, 0.1667)
    assert (point["uncertain_share"], point["accuracy"]) == (0.25, 0.5)
    assert len(fire["sweep"]) == 21 * 22 // 2

    # no real alarm may be rejected: reject below 0.15 (0.10 and 0.05 filtered); only at
    # 0.95 are the confirmations at least 90 % real
    best = fire["best"]
    assert (best["reject_below"], best["confirm_at"]) == (0.15, 0.95)
    assert (best["false_alarms_filtered"], best["real_alarms_rejected"]) == (0.3333, 0.0)

    bins = {round(b["low"], 1): b for b in fire["calibration"]}
    assert (bins[0.9]["count"], bins[0.9]["real_share"], bins[0.9]["mean_p_real"]) == (
        2,
        0.5,
        0.925,
    )
    assert (bins[0.0]["count"], bins[0.0]["real_share"]) == (1, 0.0)
    assert (bins[0.3]["count"], bins[0.5]["count"], bins[0.2]["count"]) == (2, 1, 0)
    assert bins[0.2]["real_share"] is None

    for name in ("sweep.png", "calibration.png"):
        with Image.open(run["out"] / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_a_looser_miss_target_filters_more_and_the_table_says_so(tmp_path):
    config = write_case(tmp_path)
    run = run_eval(tmp_path, config, "--json", "--target-miss-rate", "0.34")
    best = json.loads(run["output"].strip().splitlines()[-1])["rules"]["fire"]["best"]
    # misses 0.35 and 0.15 (2 of 6) while rejecting 0.45 0.30 0.10 0.05 (4 of 6)
    assert (best["reject_below"], best["confirm_at"]) == (0.5, 0.95)
    assert best["false_alarms_filtered"] == 0.6667

    table = run_eval(tmp_path, config)["output"]
    assert "fire" in table and "50.0 %" in table and "33.3 %" in table
    assert "confirm_at 0.6 / reject_below 0.4" in table
    assert "unlabelled.json" in table


def test_the_real_model_path_yields_a_report(tmp_path, tiny_model):
    config = write_case(tmp_path, backend="transformers", model=str(tiny_model))
    files = 3
    for path in sorted((tmp_path / "labelled").glob("*.json"))[files:]:
        path.unlink()
    run = run_eval(tmp_path, config, "--json")
    report = json.loads(run["output"].strip().splitlines()[-1])
    fire = report["rules"]["fire"]
    assert fire["alerts"] == files
    assert all(0 <= b["mean_p_real"] <= 1 for b in fire["calibration"] if b["count"])
    assert sum(b["count"] for b in fire["calibration"]) == files
