"""Per-rule review features against a running daemon: classify, cooldown, shadow, images."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from daemon.cli import main
from daemon.hookspecs import hookimpl
from daemon.images import Budget, fit_to_budget
from daemon.inference.instant import InstantBackend
from daemon.plugin_api import RawImage
from daemon.rules import RuleBook
from daemon.snapshots import SnapshotSet
from plugins.classify import surface_forms
from tests.conftest import (
    FIRE_RULE,
    collect,
    make_alert,
    make_settings,
    publish,
    recording,
    run_daemon,
)
from tests.direct import label_probabilities, next_token_logits, png_b64

CLASSIFY_RULE = """
[match]
event_types = ["fire"]
[review]
kind = "classify"
prompt = "What is the bright thing: fire, lamp, reflection or sunlight?"
labels = ["fire", "lamp", "reflection", "sunlight"]
confirm = ["fire"]
reject = ["lamp", "reflection", "sunlight"]
min_confidence = 0.0
"""


async def test_classify_returns_the_label_the_model_scores_highest(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "what.toml").write_text(CLASSIFY_RULE)
    image_b64, image = png_b64((448, 224))
    async with run_daemon(settings) as d:
        await d.post_alert(make_alert("cls-1", image=image_b64))
        [verdict] = (await d.wait_reviewed("cls-1"))["verdicts"]
    logits, tokenizer = next_token_logits(
        tiny_model, "What is the bright thing: fire, lamp, reflection or sunlight?", image
    )
    labels = ["fire", "lamp", "reflection", "sunlight"]
    expected = label_probabilities(logits, tokenizer, {x: surface_forms(x) for x in labels})
    assert verdict["fields"]["label"] == max(expected, key=expected.__getitem__)
    for label in labels:
        assert verdict["fields"]["scores"][label] == pytest.approx(expected[label], abs=1e-5)
    assert verdict["confidence"] == pytest.approx(expected["fire"], abs=1e-5)
    top = verdict["fields"]["label"]
    assert verdict["verdict"] == ("confirmed" if top == "fire" else "rejected")


def test_labels_whose_first_tokens_collide_are_a_load_error(tmp_path, tiny_model):
    from daemon.config import ModelSettings
    from daemon.inference.runner import ModelRunner, choice_token_ids
    from daemon.plugins import Registry, make_plugin_manager

    tokenizer = ModelRunner.load(ModelSettings(path=str(tiny_model))).tokenizer
    (tmp_path / "clash.toml").write_text(
        CLASSIFY_RULE.replace('"fire", "lamp", "reflection", "sunlight"', '"yes", "yesterday"')
        .replace('confirm = ["fire"]', 'confirm = ["yes"]')
        .replace('reject = ["lamp", "reflection", "sunlight"]', 'reject = ["yesterday"]')
    )
    kinds = Registry.collect(make_plugin_manager()).rule_kinds
    book = RuleBook(tmp_path, kinds, lambda choices: choice_token_ids(tokenizer, choices))
    [error] = book.load()
    assert error.where == "review" and "cannot be told apart" in error.reason
    assert book.rules == []
    # `rules check` finds it too when given the model, or a config naming it; without one
    # it cannot know
    args = ["rules", "check", str(tmp_path)]
    assert CliRunner().invoke(main, args).exit_code == 0
    config = tmp_path.parent / f"{tmp_path.name}.conf"
    config.write_text(f'[model]\npath = "{tiny_model}"\n')
    for extra in (["--model", str(tiny_model)], ["--config", str(config)]):
        result = CliRunner().invoke(main, [*args, *extra])
        assert (
            result.exit_code == 1
            and "clash.toml: review: answers cannot be told apart" in result.output
        ), result.output
    # a hub id not downloaded yet: said, and nothing downloaded
    config.write_text('[model]\npath = "example-org/not-downloaded"\n')
    result = CliRunner().invoke(main, [*args, "--config", str(config)])
    assert result.exit_code == 0
    assert "note: labels not checked against the model" in result.output
    # the openai backend's own rule: no label may begin another (first tokens would clash)
    (tmp_path / "clash.toml").write_text(
        CLASSIFY_RULE.replace('"fire", "lamp"', '"fire", "fireworks", "lamp"')
    )
    config.write_text('[model]\nbackend = "openai"\n')
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--config", str(config)])
    assert result.exit_code == 1
    assert "answer 'fireworks' begins with answer 'fire'" in result.output, result.output


COOLDOWN = FIRE_RULE + "[cooldown]\nwindow_s = 60\niou = 0.5\n"


async def test_cooldown_reuses_the_verdict_of_an_overlapping_repeat(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(COOLDOWN)
    sign = [{"x1": 100, "y1": 100, "x2": 200, "y2": 200}]
    nudged = [{"x1": 105, "y1": 102, "x2": 205, "y2": 198}]
    elsewhere = [{"x1": 400, "y1": 100, "x2": 500, "y2": 200}]
    args = recording(settings)
    async with run_daemon(**args) as d:
        # a red sign seen as fire every 10 s: one model call for the window
        for i, boxes in enumerate([sign, nudged, sign, sign, nudged]):
            await d.post_alert(make_alert(f"sign-{i}", boxes=boxes))
            await d.wait_reviewed(f"sign-{i}")
        assert len(d.daemon.backend.requests) == 1
        # another place in the frame, another camera, another box's camera of the same
        # name, the same sign an hour later (as after a backlog): reviewed by the model
        await d.post_alert(make_alert("other-place", boxes=elsewhere))
        await d.post_alert(make_alert("other-cam", camera_id="cam-2", boxes=sign))
        await d.post_alert(make_alert("other-box", box_id="box-2", boxes=sign))
        hour_later = "2026-11-20T15:03:12+08:00"
        await d.post_alert(make_alert("hour-later", occurred_at=hour_later, boxes=sign))
        first = (await d.wait_reviewed("sign-0"))["verdicts"][0]
        repeat = (await d.wait_reviewed("sign-3"))["verdicts"][0]
        for alert_id in ("other-place", "other-cam", "other-box", "hour-later"):
            await d.wait_reviewed(alert_id)
        assert len(d.daemon.backend.requests) == 5
        # the playground neither reuses a verdict nor lends one to live alerts
        tried = {"image": make_alert()["image"], "rule_toml": COOLDOWN, "camera_id": "cam-1"}
        for _ in range(2):
            async with d.http.post(f"{d.base_url}/v1/try", json=tried) as response:
                assert response.status == 200
                assert not (await response.json())["reason"].startswith("cooldown")
        assert len(d.daemon.backend.requests) == 7
    assert repeat["reason"].startswith("cooldown: as alert sign-0")
    assert (repeat["verdict"], repeat["confidence"]) == (first["verdict"], first["confidence"])


async def test_shadow_rule_publishes_on_the_shadow_prefix_and_forwards_unreviewed(
    tmp_path, broker, tiny_model
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model)
    (settings.rules.dir / "fire_v2.toml").write_text("shadow = true\n" + FIRE_RULE)
    topics = ("secondlook/verdicts/#", "secondlook/shadow/#")
    async with collect(broker, *topics) as out, run_daemon(settings):
        await publish(broker, "secondlook/alerts/b", json.dumps(make_alert("shadow-1")))
        by_topic = dict(await out.wait_for(2))
    [shadow_topic] = [t for t in by_topic if t.startswith("secondlook/shadow/")]
    assert shadow_topic.startswith("secondlook/shadow/secondlook/verdicts/")
    assert by_topic[shadow_topic]["rule"] == "fire_v2"
    assert by_topic[shadow_topic]["confidence"] is not None
    live = by_topic["secondlook/verdicts/unreviewed/box-t/cam-1/fire"]
    assert live["rule"] is None
    assert live["reason"] == "only rules in shadow mode matched: fire_v2"


class SlowInstant(InstantBackend):
    """Answers after a second, as a busy model would; counts the calls under way at once."""

    under_way = 0
    most = 0

    async def run(self, request):
        SlowInstant.under_way += 1
        SlowInstant.most = max(SlowInstant.most, SlowInstant.under_way)
        try:
            await asyncio.sleep(1.0)
            return await super().run(request)
        finally:
            SlowInstant.under_way -= 1


class SlowInstantPlugin:
    @hookimpl
    def register_backends(self, register):
        register("slow-instant", SlowInstant)


async def test_the_rules_of_one_alert_are_judged_side_by_side(tmp_path):
    settings = make_settings(tmp_path, broker=None, model=tmp_path)
    settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"backend": "slow-instant"})}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "fire_v2.toml").write_text("shadow = true\n" + FIRE_RULE)
    async with run_daemon(settings, extra_plugins=[SlowInstantPlugin()]) as d:
        assert (await d.post_alert(make_alert("both-1")))[0] == 202
        verdicts = (await d.wait_reviewed("both-1"))["verdicts"]
    assert sorted(v["rule"] for v in verdicts) == ["fire", "fire_v2"]
    # one second for both, not one after the other
    assert SlowInstant.most == 2 and all(v["latency_ms"] < 1900 for v in verdicts)


def scene_jpeg() -> bytes:
    image = Image.new("RGB", (1280, 720), (0, 0, 255))
    ImageDraw.Draw(image).rectangle((600, 300, 699, 399), fill=(255, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def redness(image: Image.Image) -> float:
    """The share of clearly red pixels."""
    pixels = np.asarray(image)
    return float(((pixels[..., 0] > 200) & (pixels[..., 2] < 80)).mean())


def test_image_modes_frame_crop_boxes_and_crop_plus_frame():
    raw = [RawImage("image", scene_jpeg()), RawImage("images[0]", scene_jpeg())]
    boxes = [(580.0, 280.0, 720.0, 420.0)]  # around the red square (600..699, 300..399)
    snapshots = SnapshotSet(raw, boxes, Budget(448 * 448, 28))
    [frame, extra] = snapshots.for_rule("frame", 0.25)
    assert frame.size == extra.size == (588, 336)
    assert redness(frame) < 0.02  # the detection is small in the whole frame
    [crop, _] = snapshots.for_rule("crop", 0.25)
    assert redness(crop) > 0.15  # the detection is a good part of the crop
    assert abs(crop.width / crop.height - 1.0) < 0.15
    [marked, _] = snapshots.for_rule("boxes", 0.25)
    at = (int(580 * 588 / 1280) - 1, int(350 * 336 / 720))  # just left of the box
    assert frame.getpixel(at)[2] > 200 and marked.getpixel(at)[0] > 200  # blue, now red
    assert marked.size == frame.size
    crop2, frame2, extra2 = snapshots.for_rule("crop+frame", 0.25)
    assert redness(crop2) > 0.15 and frame2.size == frame.size and extra2.size == extra.size
    # no boxes: nothing to crop or outline; the frame stands in, the pictures keep their places
    boxless = SnapshotSet(raw, [], Budget(448 * 448, 28))
    assert [i.size for i in boxless.for_rule("crop", 0.25)] == [frame.size, extra.size]
    assert [i.size for i in boxless.for_rule("boxes", 0.25)] == [frame.size, extra.size]
    both, again, extra3 = boxless.for_rule("crop+frame", 0.25)
    assert both.tobytes() == again.tobytes() == frame.tobytes() and extra3.size == extra.size


def png_scene(size: tuple[int, int], thing: tuple[int, int, int, int]) -> bytes:
    """A blue picture with a green thing, as PNG (exact colours)."""
    image = Image.new("RGB", size, (0, 0, 255))
    ImageDraw.Draw(image).rectangle(
        (thing[0], thing[1], thing[2] - 1, thing[3] - 1), fill=(0, 255, 0)
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "thing"),
    [
        ((704, 576), (500, 450, 640, 560)),  # PAL: the budget's sides scale unequally
        ((150, 2000), (20, 1218, 130, 1380)),
        ((1920, 1080), (900, 500, 920, 520)),  # a small detection
    ],
)
def test_a_drawn_box_surrounds_its_object_in_sight_whatever_the_shape(size, thing):
    snapshots = SnapshotSet(
        [RawImage("image", png_scene(size, thing))], [thing], Budget(448 * 448, 28)
    )
    [frame] = snapshots.for_rule("frame", 0.25)
    [marked] = snapshots.for_rule("boxes", 0.25)
    before, after = np.asarray(frame), np.asarray(marked)
    green = (before[..., 1] > 128) & (before[..., 0] < 128)
    red = (after[..., 0] > 200) & (after[..., 1] < 80) & (after[..., 2] < 80)
    assert not (red & green).any()  # the outline hides none of the thing
    rows, cols = np.nonzero(green)
    ring_rows, ring_cols = np.nonzero(red)
    # the outline lies just around the thing, on every side, within a line's width
    line = max(2, round(min(frame.size) / 150)) + 1
    assert 0 < rows.min() - ring_rows.min() <= line and 0 < ring_rows.max() - rows.max() <= line
    assert 0 < cols.min() - ring_cols.min() <= line and 0 < ring_cols.max() - cols.max() <= line


def test_a_small_crop_keeps_its_shape():
    thing = (946, 527, 974, 552)  # 28x25 pixels in a 1920x1080 frame
    snapshots = SnapshotSet(
        [RawImage("image", png_scene((1920, 1080), thing))], [thing], Budget(448 * 448, 28)
    )
    [crop] = snapshots.for_rule("crop", 0.25)
    assert crop.size == (56, 56)  # whole patches of source pixels: nothing stretched
    rows, cols = np.nonzero(np.asarray(crop)[..., 1] > 128)
    assert (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1) == (28, 25)


def test_the_same_snapshot_as_jpeg_or_png_is_shown_at_one_size():
    for size in [(3313, 1835), (4112, 3047), (2377, 1102), (1280, 720)]:
        image = Image.new("RGB", size, (90, 120, 30))
        sizes = set()
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            image.save(buffer, fmt)
            [frame] = SnapshotSet(
                [RawImage("image", buffer.getvalue())], [], Budget(448 * 448, 28)
            ).for_rule("frame", 0.25)
            sizes.add(frame.size)
        assert sizes == {fit_to_budget(*size, max_pixels=448 * 448, factor=28)}, size


async def test_rule_image_mode_and_extra_frames_reach_the_model(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(
        FIRE_RULE + 'image = "crop+frame"\ncrop_margin = 0.5\n'
    )
    jpeg = base64.b64encode(scene_jpeg()).decode()
    alert = make_alert(
        "modes-1",
        image=jpeg,
        images=[jpeg, jpeg],
        boxes=[{"x1": 600, "y1": 300, "x2": 700, "y2": 400}],
    )
    args = recording(settings)
    async with run_daemon(**args) as d:
        await d.post_alert(alert)
        await d.wait_reviewed("modes-1")
        [request] = d.daemon.backend.requests
    crop, frame, *extras = request.images
    assert len(extras) == 2
    # the 100x100 square in its 200x200 crop, grown to whole patches (224x224)
    assert crop.size == (224, 224) and redness(crop) > 0.19 and redness(frame) < 0.02
    assert frame.size == (588, 336)
