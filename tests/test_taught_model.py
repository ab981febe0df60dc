"""End to end with a tiny model taught fixed answers: verdicts and fields that mean something."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageDraw

from daemon.contract import Alert
from daemon.rules import parse_rule
from plugins.extract import JsonExtract
from tests.conftest import EXTRACT_RULE, FIRE_RULE, make_alert, make_settings, run_daemon
from tests.taught_model import Lesson, teach


def scene(kind: str) -> bytes:
    image = Image.new("RGB", (640, 360), (90, 90, 100))
    draw = ImageDraw.Draw(image)
    if kind == "fire":
        draw.polygon([(250, 330), (320, 80), (390, 330)], fill=(255, 120, 0))
    elif kind == "lamp":
        draw.ellipse((280, 20, 360, 100), fill=(255, 240, 180))
    else:
        for x in (100, 220, 340, 460):
            draw.rectangle((x, 150, x + 50, 330), fill=(30, 60, 200))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def taught(model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taught")
    rule = parse_rule(tmp / "people.toml", EXTRACT_RULE, {"extract": JsonExtract()})
    extract_prompt = JsonExtract().compose(Alert.model_validate(make_alert()), rule).prompt
    verdict_prompt = "Is there a real open flame? Answer yes or no."
    lessons = [
        Lesson(verdict_prompt, scene("fire"), "yes"),
        Lesson(verdict_prompt, scene("lamp"), "no"),
        Lesson(extract_prompt, scene("crowd"), '{"people": 4}'),
    ]
    return teach(model_dirs["qwen2-vl"], tmp / "model", lessons)


async def test_taught_model_confirms_fire_rejects_a_lamp_and_extracts_fields(tmp_path, taught):
    settings = make_settings(tmp_path, broker=None, model=taught)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "people.toml").write_text(EXTRACT_RULE)
    alerts = {
        "fire": make_alert("taught-fire", image=base64.b64encode(scene("fire")).decode()),
        "lamp": make_alert("taught-lamp", image=base64.b64encode(scene("lamp")).decode()),
        "crowd": make_alert(
            "taught-crowd",
            event_type="people_gathering",
            image=base64.b64encode(scene("crowd")).decode(),
        ),
    }
    async with run_daemon(settings) as d:
        for alert in alerts.values():
            assert (await d.post_alert(alert))[0] == 202
        results = {name: await d.wait_reviewed(a["alert_id"]) for name, a in alerts.items()}
    fire, lamp, crowd = (results[name]["verdicts"][0] for name in ("fire", "lamp", "crowd"))
    assert fire["verdict"] == "confirmed" and fire["confidence"] >= 0.6
    assert lamp["verdict"] == "rejected" and lamp["confidence"] < 0.4
    assert crowd["verdict"] == "confirmed", crowd["reason"]
    assert crowd["fields"] == {"people": 4}
    assert crowd["confidence"] is None
