"""The web console in a real browser (Debian's Chromium driven by Playwright) against a
running daemon: results, playground, rules saved from it, feedback, the token prompt."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import Page, async_playwright, expect

from tests.conftest import (
    CLASSIFY_RULE,
    EXTRACT_RULE,
    FIRE_RULE,
    jpeg_bytes,
    make_alert,
    make_settings,
    run_daemon,
)

CHROMIUM = "/usr/bin/chromium"
#: where the screenshots of the pages are kept for a look after the run
SHOTS = Path("/tmp/console-shots")
CONFIRM_ALL = FIRE_RULE + "confirm_at = 0.0\nreject_below = 0.0\n"


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(20_000)
            yield page
        finally:
            await browser.close()


async def shoot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=path, full_page=True)
    await asyncio.to_thread(keep_copy, path)


def keep_copy(path: Path) -> None:
    SHOTS.mkdir(exist_ok=True)
    shutil.copy(path, SHOTS / path.name)


async def test_results_page_shows_a_fresh_verdict_and_feedback_changes_the_stats(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(CONFIRM_ALL)
    (settings.rules.dir / "broken.toml").write_text("[match\n")
    async with run_daemon(settings) as d, browser_page() as page:
        await page.goto(f"{d.base_url}/console/")
        alert = make_alert("console-1", camera_id="gate-cam")
        alert["boxes"] = [{"x1": 40, "y1": 30, "x2": 300, "y2": 200}]
        assert (await d.post_alert(alert))[0] == 202
        card = page.locator('[data-testid=alert][data-alert-id="console-1"]')
        await expect(card.get_by_test_id("verdict")).to_have_text("confirmed")  # live update
        await expect(card).to_contain_text("gate-cam")
        thumb = card.get_by_test_id("thumb")
        await expect(thumb).to_have_attribute("src", re.compile("^blob:"))
        width = await thumb.evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width == 320
        await shoot(page, tmp_path, "alerts")

        await page.get_by_test_id("tab-stats").click()
        row = page.locator('[data-testid=stats-row][data-rule="fire"]')
        await expect(row.get_by_test_id("feedback-count")).to_have_text("0")
        await expect(row.get_by_test_id("precision")).to_have_text("–")

        await page.get_by_test_id("tab-alerts").click()
        await card.get_by_test_id("feedback-wrong").click()  # the "fire" was a lamp
        await expect(card.get_by_test_id("feedback-given")).to_contain_text("false (wrong)")

        await page.get_by_test_id("tab-stats").click()
        await expect(row.get_by_test_id("feedback-count")).to_have_text("1")
        await expect(row.get_by_test_id("precision")).to_have_text("0.0 %")
        await expect(page.get_by_test_id("chart")).to_have_count(1)
        await expect(page.get_by_test_id("chart")).to_contain_text("fire: verdicts per 1 h since")
        await page.get_by_test_id("period").select_option("1")  # 24 bars of 150 s
        await expect(page.get_by_test_id("chart")).to_contain_text("verdicts per 2.5 min since")
        await shoot(page, tmp_path, "stats")

        await page.get_by_test_id("tab-rules").click()
        await expect(page.get_by_test_id("rule")).to_contain_text(["fire"])
        await expect(page.get_by_test_id("rule-errors")).to_contain_text("broken.toml")
        await shoot(page, tmp_path, "rules")


async def test_playground_verdict_for_an_upload_and_a_rule_saved_from_it(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    upload = tmp_path / "forklift.jpg"
    upload.write_bytes(jpeg_bytes((800, 600), colour=(240, 200, 40)))
    async with run_daemon(settings) as d, browser_page() as page:
        await page.goto(f"{d.base_url}/console/")
        await page.get_by_test_id("tab-playground").click()
        await page.get_by_test_id("try-file").set_input_files(upload)
        await page.get_by_test_id("try-prompt").fill("Is the forklift's load above the mast?")
        await page.get_by_test_id("try-run").click()
        verdict = page.get_by_test_id("try-verdict")
        await expect(verdict).to_have_text(re.compile("^(confirmed|rejected|uncertain)$"))
        await expect(page.get_by_test_id("try-confidence")).to_have_text(
            re.compile(r"P\(real\) 0\.\d{3}")
        )
        await expect(page.get_by_test_id("try-raw")).to_contain_text('"yes"')
        await shoot(page, tmp_path, "playground")

        await page.get_by_test_id("save-name").fill("forklift_load")
        await page.get_by_test_id("save-events").fill("forklift_over_height")
        await page.get_by_test_id("save-rule").click()
        await expect(page.get_by_test_id("save-result")).to_have_text("saved as forklift_load.toml")

        alert = make_alert("lift-1", event_type="forklift_over_height")
        alert["image"] = base64.b64encode(upload.read_bytes()).decode()
        assert (await d.post_alert(alert))[0] == 202
        [made] = (await d.wait_reviewed("lift-1"))["verdicts"]
        assert made["rule"] == "forklift_load" and made["verdict"] != "unreviewed"

        # without event types it would review every alert: the page asks for them
        await page.get_by_test_id("save-name").fill("everything")
        await page.get_by_test_id("save-events").fill("")
        await page.get_by_test_id("save-rule").click()
        await expect(page.get_by_test_id("save-result")).to_contain_text("name the event types")
        assert not (settings.rules.dir / "everything.toml").exists()
        # the name of a rule file that exists: replaced once the operator agrees
        asked: list[str] = []

        async def agree(dialog) -> None:
            asked.append(dialog.message)
            await dialog.accept()

        page.once("dialog", agree)
        await page.get_by_test_id("save-name").fill("forklift_load")
        await page.get_by_test_id("save-events").fill("forklift_over_height, forklift")
        await page.get_by_test_id("save-rule").click()
        await expect(page.get_by_test_id("save-result")).to_have_text("saved as forklift_load.toml")
        assert asked == ["A rule file forklift_load.toml exists. Replace it?"]
        assert '"forklift"' in (settings.rules.dir / "forklift_load.toml").read_text()

        # a rule in force is edited from the Rules tab: its file comes into the playground
        await page.get_by_test_id("tab-rules").click()
        row = page.locator("[data-testid=rule]", has_text="forklift_load")
        await row.get_by_test_id("rule-edit").click()
        text = page.get_by_test_id("try-prompt")
        await expect(text).to_have_value(re.compile(r'event_types = \["forklift_over_height"'))
        await expect(page.get_by_test_id("try-kind")).to_have_value("rule")
        await expect(page.get_by_test_id("save-name")).to_have_value("forklift_load")
        edited = (await text.input_value()).replace("above the mast?", "above the mast? (v2)")
        await text.fill(edited)
        page.once("dialog", agree)
        await page.get_by_test_id("save-rule").click()
        await expect(page.get_by_test_id("save-result")).to_have_text("saved as forklift_load.toml")
        assert "(v2)" in (settings.rules.dir / "forklift_load.toml").read_text()
        # a proxy's error page in answer to a save is told as such
        await page.route(
            "**/v1/rules/*",
            lambda route: route.fulfill(status=502, content_type="text/html", body="<html>"),
        )
        await page.get_by_test_id("save-rule").click()
        await expect(page.get_by_test_id("save-result")).to_have_text(
            "not saved: the server answered 502 Bad Gateway without the expected data"
        )


async def test_any_listed_alerts_snapshot_can_be_tried_from_its_card(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    ids = [f"past-{i:02d}" for i in range(22)]  # the first two are past the newest 20
    async with run_daemon(settings) as d, browser_page() as page:
        for alert_id in ids:
            assert (await d.post_alert(make_alert(alert_id)))[0] == 202
        await d.wait_reviewed(ids[-1])
        await page.goto(f"{d.base_url}/console/")
        card = page.locator(f"[data-testid=alert][data-alert-id={ids[0]}]")
        await card.get_by_test_id("alert-try").click()
        await expect(page.get_by_test_id("tab-playground")).to_have_attribute(
            "aria-selected", "true"
        )
        snapshot = page.get_by_test_id("try-snapshot")
        await expect(snapshot.locator("option:checked")).to_contain_text(ids[0])
        # the playground's list of the newest 20 is drawn again: the choice stays
        await page.get_by_test_id("tab-alerts").click()
        await page.get_by_test_id("tab-playground").click()
        await expect(snapshot.locator("option:checked")).to_contain_text(ids[0])
        await page.get_by_test_id("try-prompt").fill("Is there fire?")
        await page.get_by_test_id("try-run").click()
        await expect(page.get_by_test_id("try-verdict")).to_be_visible()


async def test_the_console_asks_for_the_token_and_then_works(tmp_path, tiny_model):
    tokens = tmp_path / "tokens"
    tokens.write_text("console-token-123\n")
    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, http={"tokens_file": str(tokens)}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d, browser_page() as page:
        await page.goto(f"{d.base_url}/console/")
        login = page.get_by_test_id("login")
        await expect(login).to_be_visible()
        await shoot(page, tmp_path, "login")
        # a header carries ASCII only: refused at once, the form stays
        await page.get_by_test_id("token").fill("ы-token")
        await page.get_by_test_id("login-submit").click()
        await expect(page.get_by_test_id("status")).to_contain_text("printable ASCII")
        await expect(login).to_be_visible()
        # a wrong one (or one rotated away) is said to be refused, not merely missing
        await page.get_by_test_id("token").fill("not-the-token")
        await page.get_by_test_id("login-submit").click()
        await expect(page.get_by_test_id("status")).to_contain_text("the token was refused")
        await expect(login).to_be_visible()
        # nor is the daemon polled with it meanwhile (each refusal is a warning in its log)
        asked: list[str] = []
        page.on("request", lambda request: asked.append(request.url))
        await asyncio.sleep(4.5)  # two rounds of the alerts page's polling
        assert [url for url in asked if "/v1/" in url] == []
        await page.get_by_test_id("token").fill("console-token-123")
        await page.get_by_test_id("login-submit").click()
        await expect(login).to_be_hidden()
        async with d.http.post(
            f"{d.base_url}/v1/alerts",
            json=make_alert("behind-token"),
            headers={"Authorization": "Bearer console-token-123"},
        ) as response:
            assert response.status == 202
        card = page.locator('[data-testid=alert][data-alert-id="behind-token"]')
        await expect(card.get_by_test_id("verdict")).to_have_text(
            re.compile("^(confirmed|rejected|uncertain)$")
        )
        await expect(card.get_by_test_id("thumb")).to_have_attribute("src", re.compile("^blob:"))


async def test_the_list_keeps_the_newest_alerts_and_feedback_reaches_any_alert_id(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(CONFIRM_ALL)
    async with run_daemon(settings) as d, browser_page() as page:
        await page.goto(f"{d.base_url}/console/")
        # an alert_id a browser would rewrite in a URL's path
        assert (await d.post_alert(make_alert("..")))[0] == 202
        dots = page.locator('[data-testid=alert][data-alert-id=".."]')
        await dots.get_by_test_id("feedback-wrong").click()
        await expect(dots.get_by_test_id("feedback-given")).to_contain_text("false (wrong)")

        # a refused feedback says why on its card
        refusal = '{"error": "several boxes sent this alert_id: give box_id"}'
        await page.route(
            "**/v1/feedback",
            lambda route: route.fulfill(status=409, content_type="application/json", body=refusal),
        )
        await dots.get_by_test_id("feedback-right").click()
        await expect(dots.get_by_test_id("feedback-error")).to_contain_text("several boxes")

        # the list shows the newest 50 (alerts no rule matches: forwarded at once), and no
        # way to older ones while there are none
        cards = page.get_by_test_id("alert")
        for batch, size in enumerate((49, 11)):
            for i in range(size):
                alert = make_alert(f"smoke-{batch}-{i}", event_type="smoke")
                assert (await d.post_alert(alert))[0] == 202
            await expect(cards).to_have_count(50)
            await expect(cards.first).to_have_attribute(
                "data-alert-id", f"smoke-{batch}-{size - 1}"
            )
            await expect(page.get_by_test_id("page-older")).to_be_visible(visible=batch == 1)
        await expect(dots).to_have_count(0)
        # older pages are reached, and the newest again
        await expect(page.get_by_test_id("page-newer")).to_be_hidden()
        await page.get_by_test_id("page-older").click()
        await expect(cards).to_have_count(11)  # 61 alerts in all
        await expect(cards.last).to_have_attribute("data-alert-id", "..")
        await expect(page.get_by_test_id("page-older")).to_be_hidden()
        await page.get_by_test_id("page-newer").click()
        await expect(cards).to_have_count(50)
        # a filter that matches nothing says so
        await page.get_by_test_id("filter-camera").fill("no-such-camera")
        await page.get_by_test_id("filter-camera").dispatch_event("change")
        await expect(page.get_by_test_id("alerts-empty")).to_be_visible()


async def test_the_console_fits_a_phone_and_says_plainly_what_went_wrong(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(CONFIRM_ALL)
    async with run_daemon(settings) as d, browser_page() as page:
        assert (await d.post_alert(make_alert("phone-1")))[0] == 202
        await d.wait_reviewed("phone-1")
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        await page.set_viewport_size({"width": 360, "height": 740})
        await page.goto(f"{d.base_url}/console/")
        await expect(page.get_by_test_id("alert")).to_have_count(1)
        for tab in ("alerts", "rules", "stats", "playground"):
            await page.get_by_test_id(f"tab-{tab}").click()
            wide = await page.evaluate("document.documentElement.scrollWidth")
            assert wide <= 360, (tab, wide)
        # a long word in a result (a URL in the prompt) wraps, at a desk's width too
        await expect(page.get_by_test_id("try-snapshot").locator("option")).to_have_count(2)
        await page.get_by_test_id("try-snapshot").select_option(index=1)
        await page.get_by_test_id("try-prompt").fill("Is " + "x" * 300 + " on fire? Yes or no.")
        for width in (360, 1200):
            await page.set_viewport_size({"width": width, "height": 740})
            await page.get_by_test_id("try-run").click()
            await expect(page.get_by_test_id("try-verdict")).to_be_visible()
            wide = await page.evaluate("document.documentElement.scrollWidth")
            assert wide <= width, (width, wide)
        await page.set_viewport_size({"width": 360, "height": 740})
        await shoot(page, tmp_path, "phone")
        assert console_errors == []  # not even a favicon's 404
        # a proxy's HTML error page, and a daemon that cannot be reached
        await page.get_by_test_id("tab-alerts").click()
        await page.route(
            "**/v1/alerts?*",
            lambda route: route.fulfill(status=502, content_type="text/html", body="<html>"),
        )
        await expect(page.locator("#status")).to_contain_text(
            "the server answered 502 Bad Gateway without the expected data"
        )
        await page.unroute("**/v1/alerts?*")
        await page.route("**/v1/alerts?*", lambda route: route.abort())
        await expect(page.locator("#status")).to_contain_text("the daemon cannot be reached")


async def test_a_classify_verdicts_right_label_and_a_note_are_sent_from_its_card(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fight.toml").write_text(CLASSIFY_RULE)
    # two tokens of a random model are no JSON: an extract verdict that failed
    short = EXTRACT_RULE.replace("max_new_tokens = 24", "max_new_tokens = 2")
    (settings.rules.dir / "people.toml").write_text(short)
    async with run_daemon(settings) as d, browser_page() as page:
        await page.goto(f"{d.base_url}/console/")
        assert (await d.post_alert(make_alert("fight-1", event_type="fighting")))[0] == 202
        card = page.locator('[data-testid=alert][data-alert-id="fight-1"]')
        await expect(card.get_by_test_id("verdict")).to_have_count(1)
        await card.locator("summary").click()
        fields = card.get_by_test_id("correct-fields")
        await expect(fields).to_have_value(re.compile(r'^\{"label":"(fight|play)"\}$'))
        await expect(card.get_by_test_id("correct-hint")).to_have_text("labels: fight, play")
        # not JSON: said on the card, nothing sent
        await fields.fill("play")
        await card.get_by_test_id("correct-submit").click()
        await expect(card.get_by_test_id("feedback-error")).to_contain_text("not JSON")
        # a label the rule does not know: the daemon's reason, on the card
        await fields.fill('{"label": "dance"}')
        await card.get_by_test_id("correct-submit").click()
        await expect(card.get_by_test_id("feedback-error")).to_contain_text("one of")
        await fields.fill('{"label": "play"}')
        await card.get_by_test_id("correct-note").fill("two kids playing")
        await card.get_by_test_id("correct-submit").click()
        await expect(card.get_by_test_id("feedback-given")).to_contain_text(
            '{"label":"play"} “two kids playing”'
        )
        # the card, drawn again with the feedback, stays as the operator left it
        await expect(card.locator("details")).to_have_attribute("open", "")
        await expect(card.get_by_test_id("correct-submit")).to_be_focused()
        await expect(card.get_by_test_id("correct-note")).to_have_value("two kids playing")
        # drawn afresh, the form shows the correction given, not the model's answer
        await page.reload()
        await card.locator("summary").click()
        await expect(fields).to_have_value('{"label":"play"}')
        rows = await d.daemon.journal.read("SELECT fields, note, source FROM feedback")
        # a failed extraction has no fields, and takes the right ones all the same
        assert (await d.post_alert(make_alert("crowd-1", event_type="people_gathering")))[0] == 202
        card = page.locator('[data-testid=alert][data-alert-id="crowd-1"]')
        await expect(card.get_by_test_id("verdict")).to_have_text("uncertain")
        await card.locator("summary").click()
        # the rule's fields, left for the operator to fill in
        await expect(card.get_by_test_id("correct-fields")).to_have_value('{"people":null}')
        await expect(card.get_by_test_id("correct-hint")).to_have_text("fields: people (integer)")
        await card.get_by_test_id("correct-fields").fill('{"people": 3}')
        await card.get_by_test_id("correct-submit").click()
        await expect(card.get_by_test_id("feedback-given")).to_contain_text('{"people":3}')
        rows = await d.daemon.journal.read("SELECT fields, note, source FROM feedback ORDER BY id")
    assert [tuple(row) for row in rows] == [
        ('{"label": "play"}', "two kids playing", "console"),
        ('{"people": 3}', None, "console"),
    ]
