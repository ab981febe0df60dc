"""Snapshots by URL: fetched from allowed hosts only; a failed fetch follows the rule's on_error."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from tests.conftest import FIRE_RULE, jpeg_bytes, make_alert, make_settings, run_daemon, serve
from tests.test_faults import noise_jpeg


@contextlib.asynccontextmanager
async def snapshot_server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get(
        "/snap.jpg", lambda _: web.Response(body=jpeg_bytes(), content_type="image/jpeg")
    )
    big = noise_jpeg((1920, 1080))  # about 1 MB: it arrives in many reads
    app.router.add_get("/big.jpg", lambda _: web.Response(body=big, content_type="image/jpeg"))
    app.router.add_get("/elsewhere", lambda _: web.HTTPFound("http://169.254.169.254/"))
    async with serve(app) as base:
        yield base


async def test_image_url_on_an_allowed_host_is_fetched_and_reviewed(tmp_path, tiny_model):
    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, images={"url_hosts": ["127.0.0.1"]}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "smoke.toml").write_text(
        FIRE_RULE.replace('"fire"', '"smoke"') + 'on_error = "drop"\n'
    )
    async with snapshot_server() as base, run_daemon(settings) as d:
        alerts = {
            "url-ok": make_alert("url-ok", image=None, image_url=f"{base}/snap.jpg"),
            "url-big": make_alert("url-big", image=None, image_url=f"{base}/big.jpg"),
            "url-404": make_alert("url-404", image=None, image_url=f"{base}/missing.jpg"),
            "url-redirect": make_alert("url-redirect", image=None, image_url=f"{base}/elsewhere"),
            "url-drop": make_alert(
                "url-drop", event_type="smoke", image=None, image_url=f"{base}/missing.jpg"
            ),
        }
        for alert in alerts.values():
            assert (await d.post_alert(alert))[0] == 202
        records = {name: await d.wait_reviewed(name) for name in alerts}
    for name in ("url-ok", "url-big"):
        [ok] = records[name]["verdicts"]
        assert ok["verdict"] != "unreviewed" and ok["confidence"] is not None, ok
    for name, status in (("url-404", "404"), ("url-redirect", "302")):
        [verdict] = records[name]["verdicts"]
        assert verdict["verdict"] == "unreviewed"
        assert f"image_url answered HTTP {status}" in verdict["reason"]
    assert records["url-drop"]["verdicts"] == []
