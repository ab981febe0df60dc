"""The shipped sample alerts and example rules, end to end over a real broker."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image

from daemon.config import DEFAULT_VERDICT_TOPIC
from daemon.contract import Alert
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import RuleBook
from daemon.templates import check_topic_template, render_topic
from tests.conftest import RULES, SAMPLES, collect, make_settings, publish, run_daemon
from tests.test_http_api import CONTRACT_FIELDS

SCENARIOS = {
    "fire",
    "no_helmet",
    "forklift_overheight",
    "fighting",
    "leaning_on_goods",
    "no_workwear",
    "people_gathering",
}


def samples() -> list[dict]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(SAMPLES.glob("*.json"))]


def test_samples_cover_the_scenarios_with_real_jpeg_snapshots():
    alerts = samples()
    assert len(alerts) >= 8
    assert {alert["event_type"] for alert in alerts} >= SCENARIOS
    assert {alert["label"] for alert in alerts} == {"real", "false"}
    for alert in alerts:
        Alert.model_validate(alert)
        with Image.open(io.BytesIO(base64.b64decode(alert["image"]))) as image:
            assert image.format == "JPEG"


def live_rules(book: RuleBook, alert: dict) -> list:
    return [rule for rule in book.match(Alert.model_validate(alert)) if not rule.shadow]


def test_each_sample_matches_exactly_one_live_example_rule():
    book = RuleBook(RULES, Registry.collect(make_plugin_manager()).rule_kinds)
    assert book.load() == []
    for alert in samples():
        assert len(live_rules(book, alert)) == 1, alert["alert_id"]


async def test_every_sample_yields_one_verdict_with_every_field_on_its_topic(
    tmp_path, broker, tiny_model
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model, rules_dir=RULES)
    alerts = samples()
    book = RuleBook(RULES, Registry.collect(make_plugin_manager()).rule_kinds)
    book.load()
    async with collect(broker, "secondlook/verdicts/#", "alarms/#") as out, run_daemon(settings):
        for alert in alerts:
            await publish(broker, f"secondlook/alerts/{alert['box_id']}", json.dumps(alert))
        verdicts = await out.wait_for(len(alerts), timeout=120)
    by_id = {verdict["alert_id"]: (topic, verdict) for topic, verdict in verdicts}
    assert sorted(by_id) == sorted(alert["alert_id"] for alert in alerts)
    for alert in alerts:
        topic, verdict = by_id[alert["alert_id"]]
        assert set(verdict) == CONTRACT_FIELDS
        [rule] = live_rules(book, alert)
        assert verdict["rule"] == rule.name
        assert verdict["verdict"] in ("confirmed", "rejected", "uncertain")
        expected = render_topic(
            rule.topic or check_topic_template(DEFAULT_VERDICT_TOPIC),
            Alert.model_validate(alert),
            rule=rule.name,
            verdict=verdict["verdict"],
        )
        assert topic == expected
        for key in ("box_id", "camera_id", "event_type", "site", "occurred_at"):
            assert verdict[key] == alert[key]
