"""The prompt playground: `secondlook try`, `POST /v1/try`, and rules saved from it."""

from __future__ import annotations

import asyncio
import base64
import json

from click.testing import CliRunner

from daemon.cli import main
from tests.conftest import (
    CLASSIFY_RULE,
    EXTRACT_RULE,
    FIRE_RULE,
    jpeg_bytes,
    make_alert,
    make_settings,
    run_daemon,
)


def test_try_a_prompt_and_rules_of_each_kind_from_the_command_line(tmp_path, tiny_model):
    image = tmp_path / "frame.jpg"
    image.write_bytes(jpeg_bytes())
    runner = CliRunner()
    base = ["try", str(image), "--model", str(tiny_model), "--json"]
    result = runner.invoke(main, [*base, "--prompt", "Is there a fire? Answer yes or no."])
    assert result.exit_code == 0, result.output
    tried = json.loads(result.output.strip().splitlines()[-1])
    assert tried["verdict"] in ("confirmed", "rejected", "uncertain")
    assert 0 <= tried["confidence"] <= 1 and tried["latency_ms"] > 0
    assert tried["prompt"].startswith("Is there a fire?")
    raw = json.loads(tried["raw"])
    assert abs(raw["yes"]["p"] - tried["confidence"]) < 1e-5
    assert abs(raw["yes"]["p"] + raw["no"]["p"] - 1) < 1e-5

    for text, kind in ((CLASSIFY_RULE, "classify"), (EXTRACT_RULE, "extract")):
        rule = tmp_path / f"{kind}.toml"
        rule.write_text(text)
        result = runner.invoke(main, [*base, "--rule", str(rule)])
        assert result.exit_code == 0, result.output
        tried = json.loads(result.output.strip().splitlines()[-1])
        assert tried["kind"] == kind and tried["raw"] is not None
        assert tried["rule"] == kind  # named after its file
        if kind == "classify":
            assert set(tried["fields"]["scores"]) == {"fight", "play"}
    result = runner.invoke(main, [*base, "--prompt", "Fight?", "--kind", "classify"])
    assert result.exit_code == 2 and "needs its labels or fields" in result.output

    broken = tmp_path / "broken.toml"
    broken.write_text("[review]\nkind = 'verdict'\n")
    result = runner.invoke(main, [*base, "--rule", str(broken)])
    assert result.exit_code != 0 and "broken.toml: match: Field required" in result.output

    # saved: it matches the event type it was tried on, readable by the daemon's user
    config = tmp_path / "secondlook.toml"
    config.write_text('[rules]\ndir = "site-rules"\n')
    save = [*base, "--config", str(config), "--prompt", "Fire?", "--event-type", "fire"]
    for _ in range(2):
        result = runner.invoke(main, [*save, "--save-rule", "my_fire.toml"])
        assert result.exit_code == 0, result.output
    assert "it replaced the earlier file" in result.output
    saved = tmp_path / "site-rules" / "my_fire.toml"
    assert 'event_types = ["fire"]' in saved.read_text()
    assert saved.stat().st_mode & 0o777 == 0o644 and saved.read_text().endswith("\n")
    # a rule whose verdicts would come back as alerts is not saved (nor the model loaded)
    echo = tmp_path / "echo.toml"
    echo.write_text(FIRE_RULE + '[publish]\ntopic = "secondlook/alerts/{camera_id}"\n')
    trial = ["try", str(image), "--model", "/none", "--config", str(config), "--rule", str(echo)]
    result = runner.invoke(main, [*trial, "--save-rule", "echo"])
    assert result.exit_code != 0 and "would take its verdicts in as alerts" in result.output
    assert not (tmp_path / "site-rules" / "echo.toml").exists()
    # saved without the event type it is for, a prompt would review every alert: refused
    # before the model loads, as is a name that cannot be a file's
    for extra, message in (
        ([], "needs --event-type"),
        (["--event-type", ""], "needs --event-type"),
        (["--event-type", "x"], "letters, digits"),
    ):
        result = runner.invoke(
            main, [*base, "--prompt", "Fire?", *extra, "--save-rule", "../x", "--model", "/none"]
        )
        assert result.exit_code == 2 and message in result.output
    # text is shown as it is: brackets in a prompt are no markup
    plain = ["try", str(image), "--model", str(tiny_model)]
    result = runner.invoke(main, [*plain, "--prompt", "Is zone [/north] on [red]fire?"])
    assert result.exit_code == 0, result.output
    assert "Is zone [/north] on [red]fire?" in result.output
    # an alert the try could not make, and a rules folder it could not save into, are told
    # before the model loads
    result = runner.invoke(main, [*base, "--prompt", "x", "--camera-id", " ", "--model", "/none"])
    assert result.exit_code == 1 and "camera_id: String should have at least 1" in result.output
    config.write_text(f'[rules]\ndir = "{image}/rules"\n')  # under a file
    save = ["try", str(image), "--model", "/none", "--config", str(config), "--prompt", "Fire?"]
    result = runner.invoke(main, [*save, "--event-type", "fire", "--save-rule", "my_fire"])
    assert result.exit_code == 1 and "is no writable folder" in result.output
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    result = runner.invoke(
        main, ["try", str(not_image), "--model", str(tiny_model), "--prompt", "x"]
    )
    assert result.exit_code != 0 and "image: not a JPEG or PNG" in result.output


async def test_a_try_waits_while_an_alert_is_reviewed_alone(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    upload = base64.b64encode(jpeg_bytes(colour=(20, 200, 40))).decode()
    async with run_daemon(settings) as d:

        async def tried(image: str = upload) -> int:
            body = {"image": image, "prompt": "Smoke?"}
            async with d.http.post(f"{d.base_url}/v1/try", json=body) as response:
                return response.status

        assert await tried() == 200
        # an alert whose review a crash cut off is reviewed with nothing beside it
        async with d.daemon.pipeline.gate.review(alone=True):
            trying = asyncio.create_task(tried())
            # what needs no model is answered meanwhile
            not_an_image = base64.b64encode(b"GIF89a").decode()
            assert await asyncio.wait_for(tried(not_an_image), 5) == 400
            await asyncio.sleep(1.0)
            assert not trying.done()
        assert await asyncio.wait_for(trying, 30) == 200


async def test_the_playground_api_tries_uploads_and_stored_snapshots_and_saves_rules(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    upload = base64.b64encode(jpeg_bytes(colour=(20, 200, 40))).decode()
    async with run_daemon(settings) as d:

        async def call(method: str, path: str, **kwargs) -> tuple[int, dict]:
            async with d.http.request(method, f"{d.base_url}{path}", **kwargs) as response:
                return response.status, await response.json()

        status, tried = await call("POST", "/v1/try", json={"image": upload, "prompt": "Smoke?"})
        assert status == 200 and tried["verdict"] != "unreviewed" and tried["prompt"] == "Smoke?"
        assert 0 <= tried["confidence"] <= 1

        assert (await d.post_alert(make_alert("stored")))[0] == 202
        await d.wait_reviewed("stored")
        [listed] = (await call("GET", "/v1/alerts"))[1]["alerts"]
        snapshot = {"ref": listed["ref"], "idx": 0}
        status, again = await call(
            "POST", "/v1/try", json={"snapshot": snapshot, "prompt": "Fire?"}
        )
        assert status == 200 and again["prompt"] == "Fire?"
        # the same image and prompt as the stored alert's review: the same P(real)
        status, same = await call(
            "POST", "/v1/try", json={"snapshot": snapshot, "rule_toml": FIRE_RULE}
        )
        assert abs(same["confidence"] - listed["verdicts"][0]["confidence"]) < 1e-4

        status, body = await call("POST", "/v1/try", json={"image": "not base64!", "prompt": "x"})
        assert status == 400 and "image" in body["error"]
        status, body = await call("POST", "/v1/try", json={"image": upload})
        assert status == 400 and "prompt" in body["error"]
        status, body = await call("POST", "/v1/try", json={"img": upload, "prompt": "x"})
        assert status == 400 and body["error"].startswith("img: not a key of this request")
        status, body = await call(
            "POST", "/v1/try", json={"image": upload, "rule_toml": "[review]\nkind = 1\n"}
        )
        # where in the rule; no path of a file it never was
        assert status == 400 and "\nreview.kind: Input should be" in body["error"]
        assert body["error"].startswith("match: Field required") and ".toml" not in body["error"]
        status, body = await call(
            "POST", "/v1/try", json={"image": upload, "prompt": "Who?", "kind": "extract"}
        )
        assert status == 400 and body["error"].startswith(
            "an extract rule needs its labels or fields: send the rule file's text (rule_toml"
        )
        status, body = await call("POST", "/v1/try", json={"image": upload, "rule_toml": ["x"]})
        assert status == 400 and "rule_toml: a non-empty text is required" in body["error"]
        for key, value, message in (
            ("camera_id", [1, 2], "camera_id: a non-empty text"),
            ("event_type", "x" * 300, "event_type: String should have at most"),
        ):
            tried = {"image": upload, "prompt": "x", key: value}
            status, body = await call("POST", "/v1/try", json=tried)
            assert status == 400 and body["error"].startswith(message), body

        # saved from the playground: the next matching alert uses it at once
        status, saved = await call(
            "PUT",
            "/v1/rules/forklift_height",
            json={"prompt": "Is the load above the mast?", "event_types": ["forklift_over_height"]},
        )
        assert status == 201 and saved["file"] == "forklift_height.toml"
        assert (settings.rules.dir / "forklift_height.toml").read_text() == saved["rule_toml"]
        alert = make_alert("lift-1", event_type="forklift_over_height")
        assert (await d.post_alert(alert))[0] == 202
        [verdict] = (await d.wait_reviewed("lift-1"))["verdicts"]
        assert verdict["rule"] == "forklift_height" and verdict["verdict"] != "unreviewed"

        status, body = await call("PUT", "/v1/rules/../etc", data="x")
        assert status in (400, 404)
        status, body = await call("PUT", "/v1/rules/bad", data="[match]\nevent_types = 3\n")
        assert status == 400 and "match.event_types" in body["error"]
        status, body = await call("PUT", "/v1/rules/bad", json={"prompt": "x", "event_types": 5})
        assert status == 400 and "event_types: a text or a list of texts" in body["error"]
        # a classify rule's labels are refused by name, never dropped
        classify = {"prompt": "x", "kind": "classify", "event_types": ["fire"], "labels": ["a"]}
        status, body = await call("PUT", "/v1/rules/bad", json=classify)
        assert status == 400 and body["error"].startswith("labels: not a key of this request")
        assert not (settings.rules.dir / "bad.toml").exists()
        # a name with a newline; a rule's name another file holds; any Unicode in a prompt
        status, body = await call("PUT", "/v1/rules/nl%0A", data=FIRE_RULE)
        assert status == 400 and "name 'nl\\n'" in body["error"]
        status, body = await call("PUT", "/v1/rules/dup", data='name = "fire"\n' + FIRE_RULE)
        assert status == 400 and "rule 'fire' is already in fire.toml" in body["error"]
        assert not (settings.rules.dir / "dup.toml").exists()
        fiery = 'Is there fire 🔥 \\ "here"\u0007? Answer yes or no.'
        status, tried = await call("POST", "/v1/try", json={"image": upload, "prompt": fiery})
        assert status == 200 and tried["prompt"] == fiery
        status, saved = await call(
            "PUT", "/v1/rules/emoji", json={"prompt": fiery, "event_types": ["火灾"]}
        )
        assert status == 201 and saved["name"] == "emoji"
        emoji = d.daemon.rules.get("emoji")
        assert emoji is not None and emoji.prompt.text == fiery
        assert emoji.match.event_types == ["火灾"]
        # a rule file that cannot be written (here: a directory in its place; under systemd,
        # a rules directory the service may only read): said, not an internal error
        (settings.rules.dir / "blocked.toml").mkdir()
        status, body = await call("PUT", "/v1/rules/blocked?overwrite=1", data=FIRE_RULE)
        assert status == 409 and "cannot write the rule into" in body["error"]
        assert "must be writable by the daemon" in body["error"]
        (settings.rules.dir / "blocked.toml").rmdir()
        # ids beyond SQLite's integers: refused or not found, never an internal error
        huge = 10**20
        status, body = await call("GET", f"/v1/alerts?before={huge}")
        assert status == 400 and body["field"] == "before"
        for path in (f"/v1/snapshots/{huge}/0", f"/v1/snapshots/1/{huge}"):
            assert (await call("GET", path))[0] == 404
        status, body = await call(
            "POST", "/v1/try", json={"snapshot": {"ref": huge}, "prompt": "x"}
        )
        assert status == 400 and "snapshot: ref and idx" in body["error"]


async def test_saved_rules_name_their_event_types_and_replace_a_file_only_when_asked(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text("# the site's own notes\n" + FIRE_RULE)
    async with run_daemon(settings) as d:

        async def call(method: str, path: str, **kwargs) -> tuple[int, dict]:
            async with d.http.request(method, f"{d.base_url}{path}", **kwargs) as response:
                return response.status, await response.json()

        # no event types: it would review every alert; "*" says so on purpose
        status, body = await call("PUT", "/v1/rules/everything", json={"prompt": "Real?"})
        assert status == 400 and "event_types: name the event types" in body["error"]
        status, _ = await call(
            "PUT", "/v1/rules/everything", json={"prompt": "Real?", "event_types": "*"}
        )
        assert status == 201
        # an existing file is replaced only with ?overwrite=1
        status, body = await call("PUT", "/v1/rules/fire", data=FIRE_RULE)
        assert status == 409 and body["field"] == "name" and "overwrite=1" in body["error"]
        assert (settings.rules.dir / "fire.toml").read_text().startswith("# the site's")
        status, _ = await call("PUT", "/v1/rules/fire?overwrite=1", data=FIRE_RULE)
        assert status == 201 and (settings.rules.dir / "fire.toml").read_text() == FIRE_RULE
        # too large for the rules directory to load: refused before it is written
        big = FIRE_RULE + "#" * (1024 * 1024) + "\n"
        status, body = await call("PUT", "/v1/rules/big", data=big)
        assert status == 400 and "over 1048576 bytes" in body["error"]
        assert not (settings.rules.dir / "big.toml").exists()
        # bodies are UTF-8 whatever charset they name
        status, _ = await call(
            "PUT",
            "/v1/rules/smoke",
            data=FIRE_RULE.replace('"fire"', '"smoke"').encode(),
            headers={"Content-Type": "text/plain; charset=bogus"},
        )
        assert status == 201
        status, body = await call(
            "PUT",
            "/v1/rules/latin",
            data="# caf\xe9\n".encode("latin-1") + FIRE_RULE.encode(),
            headers={"Content-Type": "text/plain; charset=latin-1"},
        )
        assert status == 400 and "not UTF-8" in body["error"]
        status, body = await call(
            "POST",
            "/v1/try",
            data=b"{}",
            headers={"Content-Type": "application/json; charset=bogus"},
        )
        assert status == 400 and "or a stored snapshot" in body["error"]
        # a snapshot number longer than any row id: not found
        assert (await call("GET", "/v1/snapshots/" + "9" * 5000 + "/0"))[0] == 404

        # a stored snapshot is tried as its alert: camera, extra, boxes
        alert = make_alert("gate", camera_id="gate-7", extra={"zone": "loading bay"})
        assert (await d.post_alert(alert))[0] == 202
        await d.wait_reviewed("gate")
        [listed] = (await call("GET", "/v1/alerts?camera_id=gate-7"))[1]["alerts"]
        asking = FIRE_RULE.replace(
            "Is there a real open flame?", "Camera {camera_id} in {extra.zone}: flame?"
        )
        status, tried = await call(
            "POST",
            "/v1/try",
            json={"snapshot": {"ref": listed["ref"]}, "rule_toml": asking},
        )
        assert status == 200 and tried["prompt"].startswith("Camera gate-7 in loading bay:")
        # what the request changes of the alert is checked as the alert was
        status, body = await call(
            "POST",
            "/v1/try",
            json={"snapshot": {"ref": listed["ref"]}, "rule_toml": asking, "camera_id": "c" * 300},
        )
        assert status == 400 and "camera_id" in body["error"]


async def test_a_rule_saved_from_the_console_is_one_the_daemon_puts_in_force(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    rules = settings.rules.dir
    (rules / "lamps.toml").write_text('name = "blaze"\n' + FIRE_RULE)
    (rules / "明火.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d:

        async def call(method: str, path: str, **kwargs) -> tuple[int, dict]:
            async with d.http.request(method, f"{d.base_url}{path}", **kwargs) as response:
                return response.status, await response.json()

        # lamps.toml breaks: its last good "blaze" stays in force, and keeps its name
        (rules / "lamps.toml").write_text('name = "blaze"\n' + FIRE_RULE + "\n[[[ oops\n")
        d.daemon.reload_rules()
        assert d.daemon.rules.get("blaze").path.name == "lamps.toml"
        status, body = await call("PUT", "/v1/rules/blaze", data=FIRE_RULE)
        assert status == 400 and "rule 'blaze' is already in lamps.toml" in body["error"]
        assert not (rules / "blaze.toml").exists()
        # a rule file whose name a new file could not take is saved over as itself
        fiery = FIRE_RULE.replace("test fire rule", "明火")
        status, body = await call("PUT", "/v1/rules/明火?overwrite=1", data=fiery)
        assert status == 201 and body["file"] == "明火.toml", body
        assert (rules / "明火.toml").read_text() == fiery
        assert d.daemon.rules.get("明火").path.name == "明火.toml"
        # without overwrite: the file exists (so the console asks to replace it)
        status, body = await call("PUT", "/v1/rules/明火", data=FIRE_RULE)
        assert status == 409 and body["field"] == "name" and "明火.toml exists" in body["error"]
        status, body = await call("PUT", "/v1/rules/新规则", data=FIRE_RULE)  # a new file
        assert status == 400 and "name '新规则': 1 to 64 letters, digits" in body["error"]
        # a file the directory refused for taking the name of the rule in force does not
        # stop that rule being edited
        (rules / "copycat.toml").write_text('name = "明火"\n' + FIRE_RULE)
        d.daemon.reload_rules()
        assert d.daemon.rules.get("明火").path.name == "明火.toml"
        edited = "priority = 3\n" + fiery
        status, body = await call("PUT", "/v1/rules/明火?overwrite=1", data=edited)
        assert status == 201 and (rules / "明火.toml").read_text() == edited, body
        # a name another file holds is said before the question whether to replace the file
        status, body = await call("PUT", "/v1/rules/明火", data='name = "blaze"\n' + FIRE_RULE)
        assert status == 400 and "rule 'blaze' is already in lamps.toml" in body["error"]
        assert not (rules / "新规则.toml").exists()
        # a rule whose verdicts would come back as alerts is refused before it is written
        echo = FIRE_RULE + '[publish]\ntopic = "secondlook/alerts/{camera_id}"\n'
        status, body = await call("PUT", "/v1/rules/echo", data=echo)
        assert status == 400 and "would take its verdicts in as alerts" in body["error"]
        assert not (rules / "echo.toml").exists()
        # a name given as its file's is taken without ".toml"
        status, body = await call("PUT", "/v1/rules/suffixed.toml", data=FIRE_RULE)
        assert status == 201 and body["file"] == "suffixed.toml", body
        # what is not a text is refused, not written as Python would print it
        made = {"prompt": "Real?", "event_types": ["fire"]}
        for extra, message in (
            ({"description": {"a": "b"}}, "description: a text is required"),
            ({"kind": False}, "kind: a rule kind's name is required"),
            ({"kind": ""}, "kind: a rule kind's name is required"),
        ):
            status, body = await call("PUT", "/v1/rules/made", json=made | extra)
            assert status == 400 and body["error"] == message, body
        assert not (rules / "made.toml").exists()
