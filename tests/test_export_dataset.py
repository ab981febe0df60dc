"""`secondlook export-dataset`: feedback from a running daemon's journal as LLaVA samples."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from daemon import export_dataset
from daemon.cli import main
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import parse_rule
from tests.conftest import (
    CLASSIFY_RULE,
    EXTRACT_RULE,
    FIRE_RULE,
    jpeg_bytes,
    make_alert,
    make_settings,
    run_daemon,
)


def export_config(tmp_path, settings) -> Path:
    """A config file naming the daemon's journal and rules, for `export-dataset`."""
    config = tmp_path / "secondlook.toml"
    config.write_text(
        f'[storage]\ndir = "{settings.storage.dir}"\n[rules]\ndir = "{settings.rules.dir}"\n'
    )
    return config


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_feedback_becomes_llava_samples_with_the_right_answers(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    rules = settings.rules.dir
    (rules / "fire.toml").write_text(FIRE_RULE + "confirm_at = 0.0\nreject_below = 0.0\n")
    (rules / "people.toml").write_text(EXTRACT_RULE)
    # shown as a crop and the frame: the sample shows both
    (rules / "fight.toml").write_text(CLASSIFY_RULE + 'image = "crop+frame"\ncrop_margin = 0\n')
    alerts = {
        "v-real": {},
        "v-false": {"image": base64.b64encode(png_bytes()).decode()},
        "v-none": {},
        "x-fixed": {"event_type": "people_gathering"},
        "x-wrong": {"event_type": "people_gathering"},
        "c-fixed": {
            "event_type": "fighting",
            "boxes": [{"x1": 100, "y1": 50, "x2": 300, "y2": 250}],
        },
    }
    feedback = {
        "v-real": {"correct": True},
        "v-false": {"label": "false"},
        "x-fixed": {"correct": False, "fields": {"people": 4}},
        "x-wrong": {"correct": False},
        "c-fixed": {"fields": {"label": "play"}},
    }
    async with run_daemon(settings) as d:
        for alert_id, fields in alerts.items():
            assert (await d.post_alert(make_alert(alert_id, **fields)))[0] == 202
        for alert_id in alerts:
            await d.wait_reviewed(alert_id)
        for alert_id, said in feedback.items():
            async with d.http.post(
                f"{d.base_url}/v1/alerts/{alert_id}/feedback", json=said
            ) as response:
                assert response.status == 201, await response.text()
        # corrections that could not be the right answer are refused, naming why
        for alert_id, said, why in (
            ("x-wrong", {"fields": {"persons": 4}}, "persons: not a field of this rule"),
            ("x-wrong", {"fields": {"people": "many"}}, "people: "),
            ("c-fixed", {"fields": {"label": "dance"}}, "one of ['fight', 'play']"),
            ("c-fixed", {"fields": {"label": []}}, "one of ['fight', 'play']"),
            ("c-fixed", {"fields": {"label": {"a": 1}}}, "one of ['fight', 'play']"),
            ("v-none", {"fields": {"note": "x"}}, "a verdict rule has no fields to correct"),
        ):
            async with d.http.post(
                f"{d.base_url}/v1/alerts/{alert_id}/feedback", json=said
            ) as response:
                body = await response.json()
                assert response.status == 400 and why in body["error"], body
                assert body["field"] == "fields"
        # two alerts whose names read alike once made file-safe stay two samples
        for box_id in ("a b", "a_b"):
            assert (await d.post_alert(make_alert("x", box_id=box_id)))[0] == 202
        for box_id, label in (("a b", "real"), ("a_b", "false")):
            async with asyncio.timeout(30):
                while (await d.get_alert("x", box_id=box_id))[1].get("state") != "reviewed":
                    await asyncio.sleep(0.05)
            async with d.http.post(
                f"{d.base_url}/v1/feedback",
                json={"alert_id": "x", "box_id": box_id, "rule": "fire", "label": label},
            ) as response:
                assert response.status == 201, await response.text()

    config = tmp_path / "secondlook.toml"
    config.write_text(f'[storage]\ndir = "{settings.storage.dir}"\n')
    out = tmp_path / "dataset"
    result = CliRunner().invoke(
        main, ["export-dataset", "--config", str(config), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "6 samples written" in result.output
    assert "1 left out: the feedback does not give the right answer" in result.output

    samples = {s["id"]: s for s in json.loads((out / "dataset.json").read_text())}
    assert set(samples) == {
        "1-box-t-v-real-fire",
        "2-box-t-v-false-fire",
        "4-box-t-x-fixed-people",
        "6-box-t-c-fixed-fight",
        "7-a_b-x-fire",
        "8-a_b-x-fire",
    }
    assert [samples[f"{ref}-a_b-x-fire"]["conversations"][1]["value"] for ref in (7, 8)] == [
        "yes",
        "no",
    ]
    fire = samples["1-box-t-v-real-fire"]
    assert fire["image"] == "images/1-box-t-v-real-fire.jpg"
    assert fire["conversations"] == [
        {"from": "human", "value": "<image>\nIs there a real open flame? Answer yes or no."},
        {"from": "gpt", "value": "yes"},
    ]
    assert samples["2-box-t-v-false-fire"]["conversations"][1]["value"] == "no"
    assert samples["4-box-t-x-fixed-people"]["conversations"][1]["value"] == '{"people":4}'
    assert samples["4-box-t-x-fixed-people"]["conversations"][0]["value"].startswith(
        "<image>\nCount the people."
    )
    fight = samples["6-box-t-c-fixed-fight"]
    assert fight["conversations"][1]["value"] == "play"
    assert fight["image"] == [
        "images/6-box-t-c-fixed-fight-0.jpg",
        "images/6-box-t-c-fixed-fight-1.jpg",
    ]
    assert fight["conversations"][0]["value"].startswith("<image>\n<image>\nWhat do the people do?")
    sizes = [Image.open(out / path).size for path in fight["image"]]
    assert sizes == [(200, 200), (640, 360)]  # the crop, then the frame, at full resolution
    for sample in samples.values():
        for path in [sample["image"]] if isinstance(sample["image"], str) else sample["image"]:
            with Image.open(out / path) as image:
                assert image.format == "JPEG"  # the PNG snapshot too
    assert (out / "images" / "1-box-t-v-real-fire.jpg").read_bytes() == jpeg_bytes()

    # filters
    only = tmp_path / "only-fire"
    result = CliRunner().invoke(
        main, ["export-dataset", "--config", str(config), "--out", str(only), "--rules", "fire"]
    )
    assert "4 samples written" in result.output
    # again into the first folder, one rule only: the other rules' images go with the rest
    export = ["export-dataset", "--config", str(config), "--out", str(out)]
    result = CliRunner().invoke(main, [*export, "--rules", "fire", "--rules", "smoke"])
    assert "4 samples written" in result.output
    assert "no feedback in the journal names the rule 'smoke'" in result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "1-box-t-v-real-fire.jpg",
        "2-box-t-v-false-fire.jpg",
        "7-a_b-x-fire.jpg",
        "8-a_b-x-fire.jpg",
    ]
    # --since: a time with an offset is compared as the instant it names
    in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).astimezone(timezone(timedelta(hours=8)))
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    for since, written in ((in_an_hour, 0), (an_hour_ago.replace(tzinfo=None), 6)):
        result = CliRunner().invoke(main, [*export, "--since", since.isoformat()])
        assert f"{written} samples written" in result.output, (since, result.output)
    result = CliRunner().invoke(main, [*export, "--since", "2026-13-45"])
    assert result.exit_code == 2 and "no ISO 8601 date or time" in result.output


async def test_two_samples_never_share_an_image_file(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    # "a" shows a crop and the frame (…-a-0.jpg, …-a-1.jpg); "a-0" the frame (…-a-0.jpg)
    (settings.rules.dir / "a.toml").write_text(
        FIRE_RULE + 'image = "crop+frame"\ncrop_margin = 0\n'
    )
    (settings.rules.dir / "a-0.toml").write_text(FIRE_RULE)
    boxes = [{"x1": 100, "y1": 50, "x2": 300, "y2": 250}]
    async with run_daemon(settings) as d:
        assert (await d.post_alert(make_alert("x", boxes=boxes)))[0] == 202
        await d.wait_reviewed("x")
        for rule in ("a", "a-0"):
            async with d.http.post(
                f"{d.base_url}/v1/alerts/x/feedback", json={"rule": rule, "label": "real"}
            ) as response:
                assert response.status == 201, await response.text()
    config = export_config(tmp_path, settings)
    out = tmp_path / "dataset"
    result = CliRunner().invoke(
        main, ["export-dataset", "--config", str(config), "--out", str(out)]
    )
    assert "2 samples written" in result.output, result.output
    samples = json.loads((out / "dataset.json").read_text())
    names = [
        name
        for s in samples
        for name in ([s["image"]] if isinstance(s["image"], str) else s["image"])
    ]
    assert len(names) == len(set(names)) == 3, names
    [crop_and_frame] = [s["image"] for s in samples if isinstance(s["image"], list)]
    assert Image.open(out / crop_and_frame[0]).size == (200, 200)  # the crop, not overwritten


def test_a_file_that_is_no_journal_is_one_error_line(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "journal.sqlite3").write_bytes(b"this is not a database" * 10)
    config = tmp_path / "secondlook.toml"
    config.write_text('[storage]\ndir = "var"\n')
    result = CliRunner().invoke(
        main, ["export-dataset", "--config", str(config), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert (
        "the journal" in result.output and "cannot be read: file is not a database" in result.output
    )


async def test_long_names_turned_snapshots_and_files_of_no_export_in_the_folder(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: upright it is 48 wide, 64 high
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, "JPEG", exif=exif)
    turned = base64.b64encode(buffer.getvalue()).decode()
    box, alert_id = "b" * 200, "a" * 200  # as long as the contract allows, nearly
    async with run_daemon(settings) as d:
        alert = make_alert(alert_id, box_id=box, image=turned)
        assert (await d.post_alert(alert))[0] == 202
        await d.wait_reviewed(alert_id)
        async with d.http.post(
            f"{d.base_url}/v1/alerts/{alert_id}/feedback", json={"rule": "fire", "label": "real"}
        ) as response:
            assert response.status == 201, await response.text()
    config = export_config(tmp_path, settings)
    out = tmp_path / "dataset"
    export = ["export-dataset", "--config", str(config), "--out", str(out)]
    for _ in range(2):  # the second replaces the first
        result = CliRunner().invoke(main, export)
        assert "1 samples written" in result.output, result.output
    [sample] = json.loads((out / "dataset.json").read_text())
    assert len(sample["image"]) < 200 and [p.name for p in (out / "images").iterdir()] == [
        sample["image"].removeprefix("images/")
    ]
    with Image.open(out / sample["image"]) as exported:
        assert exported.size == (48, 64)  # as the model saw it
    (out / "images" / "holiday.jpg").write_bytes(buffer.getvalue())
    result = CliRunner().invoke(main, export)
    assert result.exit_code == 1 and "holds files of no earlier export (holiday.jpg)" in (
        result.output
    )
    assert (out / "images" / "holiday.jpg").exists()
    (out / "images" / "holiday.jpg").unlink()
    # another tool's dataset (COCO-style names): refused, its pictures kept
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "images" / "000000397133.jpg").write_bytes(buffer.getvalue())
    (coco / "dataset.json").write_text('[{"id": "1", "image": "images/000000397133.jpg"}]')
    result = CliRunner().invoke(main, [*export[:-1], str(coco)])
    assert result.exit_code == 1 and "is another tool's" in result.output
    assert (coco / "images" / "000000397133.jpg").exists()

    # a dataset.json edited to list a file outside the folder: it is left alone
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    listing = json.loads((out / "dataset.json").read_text())
    listing.append({"id": "x", "image": ["images/../../victim.txt", "images/../dataset.json"]})
    (out / "dataset.json").write_text(json.dumps(listing))
    result = CliRunner().invoke(main, export)
    assert result.exit_code == 0 and victim.read_text() == "keep", result.output
    assert (out / "dataset.json").exists()

    # an export cut short leaves the folder as the last one did: the next one goes through
    interrupted = tmp_path / "interrupted"
    journal = settings.storage.dir / "journal.sqlite3"

    def stop() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_dataset.export(journal, interrupted, progress=stop)
    (interrupted / ".dataset.json.partial").mkdir()  # past its pictures, at its listing
    with pytest.raises(IsADirectoryError):
        export_dataset.export(journal, interrupted)
    assert not list((interrupted / "images").iterdir())
    assert not (interrupted / "dataset.json").exists()
    (interrupted / ".dataset.json.partial").rmdir()
    result = CliRunner().invoke(main, [*export[:-1], str(interrupted)])
    assert "1 samples written" in result.output, result.output


def test_a_right_classify_verdict_vouches_for_its_label_only_when_its_side_has_one(tmp_path):
    kinds = Registry.collect(make_plugin_manager()).rule_kinds
    rule = parse_rule(
        tmp_path / "fire_source.toml",
        '[match]\nevent_types = ["fire"]\n[review]\nkind = "classify"\nprompt = "What?"\n'
        'labels = ["fire", "lamp", "sunlight"]\nconfirm = ["fire"]\n'
        'reject = ["lamp", "sunlight"]\n',
        kinds,
    )
    now = export_dataset.RuleNow.of(rule)
    assert now.sole_labels == {"confirmed": "fire"}
    said_right = {"corrected": None, "correct": 1, "label": None}

    def verdict(kind: str, label: str) -> dict:
        return {"verdict": kind, "confidence": 0.9, "fields": {"label": label, "scores": {}}}

    assert export_dataset.answer_for(said_right, verdict("confirmed", "fire"), now) == "fire"
    # rejected as a lamp, rightly: a false alarm, but sunlight would have been as right
    assert export_dataset.answer_for(said_right, verdict("rejected", "lamp"), now) is None
    corrected = {"corrected": '{"label": "sunlight"}', "correct": 1, "label": None}
    assert export_dataset.answer_for(corrected, verdict("rejected", "lamp"), now) == "sunlight"
    assert export_dataset.kind_of(verdict("confirmed", "fire")) == now.kind  # else skipped


def test_an_export_written_before_the_marker_is_replaced_and_another_tools_refused(tmp_path):
    ours = tmp_path / "ours"
    (ours / "images").mkdir(parents=True)
    (ours / "images" / "7-box-1-alert-9-fire.jpg").write_bytes(b"jpeg")
    listing = [{"id": "7-box-1-alert-9-fire", "image": "images/7-box-1-alert-9-fire.jpg"}]
    (ours / "dataset.json").write_text(json.dumps(listing))
    assert export_dataset._earlier_images(ours) == {"7-box-1-alert-9-fire.jpg"}
    theirs = tmp_path / "theirs"
    (theirs / "images").mkdir(parents=True)
    (theirs / "images" / "000000397133.jpg").write_bytes(b"jpeg")
    (theirs / "dataset.json").write_text('[{"id": "1", "image": "images/000000397133.jpg"}]')
    with pytest.raises(export_dataset.ExportError, match="is another tool's"):
        export_dataset._earlier_images(theirs)
