"""HTTP ingest against a running daemon (HTTP only: no broker needed)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket

from structlog.testing import capture_logs
from yarl import URL

from tests.conftest import FIRE_RULE, jpeg_bytes, make_alert, make_settings, run_daemon

CONTRACT_FIELDS = {
    "schema",
    "alert_id",
    "box_id",
    "camera_id",
    "event_type",
    "site",
    "occurred_at",
    "rule",
    "verdict",
    "confidence",
    "reason",
    "fields",
    "model",
    "received_at",
    "reviewed_at",
    "latency_ms",
}


async def test_posted_alert_is_read_back_with_its_verdict(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d:
        alert = make_alert("http-1")
        status, body = await d.post_alert(alert)
        assert status == 202
        assert body["alert_id"] == "http-1" and body["status"] == "accepted"
        record = await d.wait_reviewed("http-1")
        assert record["box_id"] == "box-t" and record["source"] == "http"
        [verdict] = record["verdicts"]
        assert verdict.keys() >= CONTRACT_FIELDS
        assert verdict["rule"] == "fire"
        assert verdict["verdict"] in ("confirmed", "rejected", "uncertain")
        assert 0.0 <= verdict["confidence"] <= 1.0
        assert verdict["occurred_at"] == alert["occurred_at"]
        assert verdict["model"] == tiny_model.name


async def test_unknown_alert_is_404_and_ambiguous_id_is_409(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    async with run_daemon(settings) as d:
        status, body = await d.get_alert("nope")
        assert status == 404 and body["field"] == "alert_id"
        for box in ("box-a", "box-b"):
            status, _ = await d.post_alert(make_alert("shared-id", box_id=box))
            assert status == 202
        status, body = await d.get_alert("shared-id")
        assert status == 409 and "box-a" in body["error"]
        status, body = await d.get_alert("shared-id", box_id="box-b")
        assert status == 200 and body["box_id"] == "box-b"
        # the answer's url finds the alert whatever its id holds
        for alert_id in ("a/b?c#d é", "{a}b{", "..", "."):
            status, body = await d.post_alert(make_alert(alert_id, box_id="box &c"))
            if not alert_id.strip("."):  # a dot segment: clients such as curl resolve it away
                assert body["url"].split("?")[0].rsplit("/", 1)[1] != alert_id
            url = URL(f"{d.base_url}{body['url']}", encoded=True)
            async with d.http.get(url) as response:
                assert response.status == 200
                assert (await response.json())["alert_id"] == alert_id
            await d.wait_reviewed(alert_id)
            feedback = url.with_path(url.raw_path + "/feedback", encoded=True)
            async with d.http.post(feedback, json={"label": "real"}) as response:
                # its route found (no rule here to judge it), not aiohttp's plain 404
                assert response.status == 409 and "no rule" in (await response.json())["error"]


async def test_answers_carry_headers_that_keep_browsers_from_misreading_them(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    async with run_daemon(settings) as d:
        assert (await d.post_alert(make_alert("pic")))[0] == 202
        await d.wait_reviewed("pic")
        for path in ("/console/", "/console/static/app.js", "/v1/snapshots/1/0", "/v1/alerts"):
            async with d.http.get(f"{d.base_url}{path}") as response:
                assert response.status == 200, path
                headers = response.headers
            assert headers["X-Content-Type-Options"] == "nosniff", path
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
            if path.startswith("/v1/snapshots"):
                assert headers["Cache-Control"] == "no-store"  # row ids come back in a new journal


def _truncated_jpeg() -> str:
    return base64.b64encode(jpeg_bytes()[:-200]).decode()


BAD_ALERTS = [
    (b"{not json", "payload", "not valid JSON"),
    (b"[1, 2]", "payload", "expected a JSON object"),
    ({k: v for k, v in make_alert().items() if k != "camera_id"}, "camera_id", "required"),
    (make_alert(score="high"), "score", "valid number"),
    (make_alert(alert_id=42), "alert_id", "valid string"),
    (make_alert(occurred_at="yesterday"), "occurred_at", "RFC 3339"),
    (make_alert(image="***not base64***"), "image", "base64"),
    (make_alert(image=_truncated_jpeg()), "image", "truncated JPEG"),
    (
        make_alert(image=base64.b64encode(b"GIF89a not a photo").decode()),
        "image",
        "not a JPEG or PNG",
    ),
    (make_alert(image=None), "image", "one of image or image_url"),
    (make_alert(image=None, image_url="http://169.254.169.254/x"), "image_url", "allowed hosts"),
    (make_alert(image=None, image_url=""), "image", "one of image or image_url"),
    (make_alert(image=None, image_url="http://[::1/x"), "image_url", "not a valid URL"),
    # what the fetch could not read either: refused at intake, not unreviewed later
    (make_alert(image=None, image_url="http://[::1]:99999/x"), "image_url", "not a valid URL"),
    (make_alert(image=None, image_url="http://[::1]:abc/x"), "image_url", "not a valid URL"),
    (make_alert(image=None, image_url="http://a\\@[::1]/x"), "image_url", "not a valid URL"),
    # extra frames, and the frame itself behind a URL: that URL is checked at intake too
    (
        make_alert(
            image=None,
            images=[base64.b64encode(jpeg_bytes()).decode()],
            image_url="http://169.254.169.254/x",
        ),
        "image_url",
        "allowed hosts",
    ),
    (make_alert(boxes=[{"x1": 5, "y1": 5, "x2": 1, "y2": 9}]), "boxes[0]", "x2/y2"),
]


async def test_malformed_alerts_are_refused_naming_the_field(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d:
        with capture_logs() as logs:
            for alert, field, message in BAD_ALERTS:
                status, body = await d.post_alert(alert)
                assert status == 400, (field, body)
                assert body["field"] == field, body
                assert message in body["error"], body
        refusals = [entry for entry in logs if entry["event"] == "alert refused"]
        assert [entry["field"] for entry in refusals] == [field for _, field, _ in BAD_ALERTS]
        # every refusal is recorded in the journal with the field at fault
        journal = d.daemon.journal
        assert [field for field, _ in await journal.rejects()] == [f for _, f, _ in BAD_ALERTS]
        # and the next good alert is still reviewed
        status, _ = await d.post_alert(make_alert("good-after-bad"))
        assert status == 202
        record = await d.wait_reviewed("good-after-bad")
        assert record["verdicts"][0]["rule"] == "fire"


async def test_body_over_the_limit_is_413_and_wrong_type_is_415(tmp_path, tiny_model, caplog):
    settings = make_settings(tmp_path, broker=None, model=tiny_model, http={"max_body_mb": 0.01})
    async with run_daemon(settings) as d:
        status, body = await d.post_alert(make_alert(extra={"pad": "x" * 20_000}))
        assert status == 413 and body["field"] == "payload"
        async with d.http.post(
            f"{d.base_url}/v1/alerts", data=b"x", headers={"Content-Type": "text/plain"}
        ) as response:
            assert response.status == 415
            assert (await response.json())["field"] == "Content-Type"
        # a body that does not decode as its Content-Encoding says: 400, not a 500
        gzip_said = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        with capture_logs() as logs:
            async with d.http.post(
                f"{d.base_url}/v1/alerts", data=b'{"a": 1}', headers=gzip_said
            ) as response:
                assert response.status == 400
                assert (await response.json())["error"].startswith(
                    "the request body cannot be read"
                )
            # a client that leaves mid-body: no traceback, intake goes on
            host, port = d.settings.http.listen.rsplit(":", 1)
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/feedback HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                b'application/json\r\nContent-Length: 1000\r\n\r\n{"alert_id": '
            )
            await writer.drain()
            writer.close()
            async with asyncio.timeout(10):
                while not any(e["event"] == "http client went away mid-request" for e in logs):
                    await asyncio.sleep(0.05)
        # nor does aiohttp log one of its own (it would read the undecodable body on)
        assert not [r for r in caplog.records if r.name.startswith("aiohttp")], caplog.text
        worse = [e for e in logs if e["log_level"] in ("error", "critical")]
        assert [e["event"] for e in worse] == ["alert refused"], logs
        assert (
            worse[0]["error"]
            == "the request body cannot be read: Can not decode content-encoding: gzip"
        )
        assert (await d.post_alert(make_alert("after-the-odd-ones")))[0] == 202
        # recorded like every refusal
        rejects = await d.daemon.journal.rejects()
    assert [field for field, _ in rejects] == ["payload", "Content-Type", "payload"]
    assert "over the limit of 10485 bytes" in rejects[0][1] and "text/plain" in rejects[1][1]


async def test_a_request_that_does_not_parse_gets_a_400_naming_why_and_one_log_line(
    tmp_path, tiny_model, caplog
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    requests = {
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": "Got more than 8190 bytes",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"b" * 9000 + b"\r\n\r\n": "8190 bytes",
        b"GET /healthz HTTP/1.1\r\n\r\n": "Missing 'Host' header",
    }
    async with run_daemon(settings) as d:
        host, port = d.settings.http.listen.rsplit(":", 1)
        with capture_logs() as logs:
            for raw, why in requests.items():
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(raw)
                await writer.drain()
                async with asyncio.timeout(10):
                    answer = await reader.read()
                writer.close()
                assert answer.startswith(b"HTTP/1.0 400 Bad Request"), answer[:200]
                assert why.encode() in answer.split(b"\r\n\r\n", 1)[1]
        # one line each, naming the problem, no traceback of aiohttp's own
        refused = [e for e in logs if e["event"] == "http request that does not parse refused"]
        whys = zip(refused, requests.values(), strict=True)
        assert all(why in entry["error"] for entry, why in whys), refused
        assert refused[0]["log_level"] == "info" and refused[0]["peer"] == "127.0.0.1"
        assert not [r for r in caplog.records if r.name.startswith("aiohttp")], caplog.text
        assert (await d.post_alert(make_alert("after-the-unparsable")))[0] == 202


async def test_healthz_reports_ready_state(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d, d.http.get(f"{d.base_url}/healthz") as response:
        assert response.status == 200
        body = json.loads(await response.text())
        assert body["status"] == "ok" and body["mqtt"] == "disabled"
        assert body["rules"] == ["fire"] and body["rule_errors"] == []


async def test_clients_that_stop_sending_are_cut_off_and_intake_goes_on(
    tmp_path, tiny_model, monkeypatch
):
    monkeypatch.setattr("daemon.http_api.HEADER_TIMEOUT_S", 1.0)
    monkeypatch.setattr("daemon.http_api.BODY_GRACE_S", 1.0)
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d:
        host, port = d.settings.http.listen.split(":")
        # half a request's headers, then nothing: the connection is closed
        idle_reader, idle = await asyncio.open_connection(host, port)
        idle.write(b"POST /v1/alerts HTTP/1.1\r\nHost: localhost\r\n")
        # a body announced longer than what is sent: 408, recorded as a refusal
        body = json.dumps(make_alert("slow-1")).encode()
        slow_reader, slow = await asyncio.open_connection(host, port)
        slow.write(
            b"POST /v1/alerts HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:100]
        )
        async with asyncio.timeout(10):
            assert await idle_reader.read() == b""
            answer = await slow_reader.readuntil(b"}")  # (closed after aiohttp's lingering)
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"request body not received in time: 100 bytes in 1 s" in answer
        for writer in (idle, slow):
            writer.close()
        assert (await d.post_alert(make_alert("after-slow")))[0] == 202
        assert (await d.wait_reviewed("after-slow"))["verdicts"][0]["rule"] == "fire"
        assert (await d.get_alert("slow-1"))[0] == 404  # never taken
        rejects = await d.daemon.journal.rejects()
    assert ("payload", "request body not received in time: 100 bytes in 1 s") in rejects


async def test_a_client_that_stops_reading_its_answers_is_cut_off(
    tmp_path, tiny_model, monkeypatch
):
    monkeypatch.setattr("daemon.http_api.WRITE_STALL_S", 1.0)
    monkeypatch.setattr("daemon.http_api.WRITE_SWEEP_S", 0.25)
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    closed = "http client stopped reading its answers: connection closed"
    async with run_daemon(settings) as d:
        host, port = d.settings.http.listen.split(":")
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect((host, int(port)))
        reader.setblocking(False)
        # pipelined requests whose answers are never read: they fill the socket's buffers
        requests = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" * 5000
        with capture_logs() as logs:
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(3):
                    await asyncio.get_running_loop().sock_sendall(reader, requests)
            async with asyncio.timeout(10):
                while not any(entry["event"] == closed for entry in logs):
                    await asyncio.sleep(0.2)
        assert d.daemon.api._runner.server.connections == []
        reader.close()
        assert (await d.post_alert(make_alert("after-stall")))[0] == 202  # others are served


async def test_a_stop_does_not_wait_long_for_an_upload_under_way(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    async with run_daemon(settings) as d:
        host, port = d.settings.http.listen.split(":")
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(  # a 4 MB snapshot coming slowly: far from done when the stop comes
            b"POST /v1/alerts HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4000000\r\n\r\n" + b"{" + b" " * 200_000
        )
        await writer.drain()
        await asyncio.sleep(0.5)
        started = asyncio.get_running_loop().time()
        d.stop.set()
        await asyncio.wait_for(d.task, 30)
        stop_s = asyncio.get_running_loop().time() - started
        writer.close()
    assert stop_s < 15  # aiohttp's own default would hold it for 60 s


async def test_console_routes_cut_off_a_body_that_stops_coming(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr("daemon.http_api.BODY_GRACE_S", 1.0)
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    async with run_daemon(settings) as d:
        host, port = d.settings.http.listen.split(":")

        async def answer_to_a_stalled_body(method: str, path: str) -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
                "Content-Length: 1000\r\n\r\n{".encode()
            )
            try:
                async with asyncio.timeout(10):
                    return await reader.readuntil(b"}")
            finally:
                writer.close()

        answers = await asyncio.gather(
            *(
                answer_to_a_stalled_body(method, path)
                for method, path in [
                    ("POST", "/v1/feedback"),
                    ("POST", "/v1/try"),
                    ("PUT", "/v1/rules/slow"),
                ]
            )
        )
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"request body not received in time: 1 bytes in 1 s" in answer
